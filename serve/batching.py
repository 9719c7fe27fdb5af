"""Many requests, one forward pass: steps are stacked, run together, split back.

A step is one sequence's tokens and its memory (batch 1). No step is padded: a pad token would
advance a session's memory. Every memory layer is chunk invariant (reading 7 tokens is reading 1
then 6), so steps of different lengths advance in lockstep: each pass runs every unfinished step
for as many tokens as the shortest of them has left, so a batch of lengths {1, 4, 7} takes 3
passes of 3, 2 and 1 sequences, and every step shares the first pass. The one exception is an
encoder-decoder whose cross memory forgets at call ends: there steps of equal length share a
pass, one pass per length. States with different slot counts stack thanks to
`ModelState.stack`'s padding with empty slots, which every mechanism ignores.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memory_models.architectures import TokenModel


@dataclass(frozen=True)
class Step:
    tokens: Tensor  # [T] long
    state: Any  # the model's state for one sequence (ModelState or EncoderDecoderState)


@dataclass(frozen=True)
class StepResult:
    logits: Tensor  # [T, vocab]
    state: Any  # the model's state for one sequence (ModelState or EncoderDecoderState)


@torch.inference_mode()
def run_steps(model: TokenModel, steps: list[Step]) -> list[StepResult]:
    """Results in the order of `steps`: in lockstep passes, or one forward per distinct length
    where a cross memory forgets at call ends."""
    if _may_run_in_lockstep(model):
        return _lockstep(model, steps)
    return _by_length(model, steps)


def _may_run_in_lockstep(model: TokenModel) -> bool:
    """Steps may advance in lockstep: every self-memory layer is chunk invariant by contract
    (`memory_models.layer`), so only a cross memory that forgets at call ends prevents it."""
    cross = getattr(model.config, "cross_memory", None)
    return cross is None or cross.forget_threshold == 0


def _lockstep(model: TokenModel, steps: list[Step]) -> list[StepResult]:
    states = [step.state for step in steps]
    done = [0] * len(steps)
    pieces: list[list[Tensor]] = [[] for _ in steps]
    active = list(range(len(steps)))
    while active:
        width = min(steps[i].tokens.shape[0] - done[i] for i in active)
        tokens = torch.stack([steps[i].tokens[done[i] : done[i] + width] for i in active])
        logits, state = model(tokens, _stack([states[i] for i in active]))
        for i, row, part in zip(active, logits, state.split(1), strict=True):
            pieces[i].append(row)
            states[i], done[i] = part, done[i] + width
        active = [i for i in active if done[i] < steps[i].tokens.shape[0]]
    return [StepResult(torch.cat(p), s) for p, s in zip(pieces, states, strict=True)]


def _by_length(model: TokenModel, steps: list[Step]) -> list[StepResult]:
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, step in enumerate(steps):
        by_length[step.tokens.shape[0]].append(index)
    results: list[StepResult | None] = [None] * len(steps)
    for indices in by_length.values():
        group = [steps[i] for i in indices]
        for index, result in zip(indices, _run_group(model, group), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


def _run_group(model: TokenModel, steps: list[Step]) -> list[StepResult]:
    tokens = torch.stack([step.tokens for step in steps])  # [G, T]
    state = _stack([step.state for step in steps])
    logits, state = model(tokens, state)  # [G, T, vocab]
    return [StepResult(row, part) for row, part in zip(logits, state.split(1), strict=True)]


def _stack(states: list[Any]) -> Any:
    return type(states[0]).stack(states)
