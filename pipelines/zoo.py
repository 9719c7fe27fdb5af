"""The model-zoo smoke: every registered mechanism built, streamed through in segments, measured.

It is the first thing a new user runs: it proves each mechanism works end to end on this machine
and shows, side by side, what each one costs in parameters, memory per sequence and speed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY


@dataclasses.dataclass(frozen=True)
class ZooSettings:
    batch_size: int = 8
    seq_len: int = 256
    segment_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    vocab_size: int = 256
    memory_size: int = 32
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ZooRow:
    kind: str
    parameters: int
    state_bytes_per_sequence: int
    live_entries: float
    tokens_per_second: float
    final_loss: float


def measure_kind(kind: str, settings: ZooSettings) -> ZooRow:
    """Stream one random batch through a fresh model in segments, carrying memory between them."""
    torch.manual_seed(settings.seed)
    model = SequenceModelConfig(
        vocab_size=settings.vocab_size,
        d_model=settings.d_model,
        n_layers=settings.n_layers,
        memory={"kind": kind, "memory_size": settings.memory_size},
    ).build()
    tokens = torch.randint(0, settings.vocab_size, (settings.batch_size, settings.seq_len + 1))
    state, loss = None, torch.tensor(0.0)
    start = time.perf_counter()
    for begin in range(0, settings.seq_len, settings.segment_len):
        end = min(begin + settings.segment_len, settings.seq_len)
        logits, state = model(tokens[:, begin:end], state)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, begin + 1 : end + 1].flatten()
        )
        loss.backward()
        state = state.detach()
    elapsed = time.perf_counter() - start
    live = sum(s.live_entries().float().mean().item() for s in state.layers) / len(state.layers)
    return ZooRow(
        kind=kind,
        parameters=model.num_parameters(),
        state_bytes_per_sequence=state.nbytes_per_sequence(),
        live_entries=live,
        tokens_per_second=settings.batch_size * settings.seq_len / elapsed,
        final_loss=loss.item(),
    )


def run_zoo(
    settings: ZooSettings,
    kinds: list[str] | None = None,
    on_done: Callable[[ZooRow], None] | None = None,
) -> list[ZooRow]:
    rows = []
    for kind in kinds or list(REGISTRY):
        if kind not in REGISTRY:
            raise ValueError(f"unknown mechanism {kind!r}; known: {', '.join(REGISTRY)}")
        rows.append(measure_kind(kind, settings))
        if on_done is not None:
            on_done(rows[-1])
    return rows
