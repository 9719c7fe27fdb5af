"""SequenceModel over every mechanism: shapes, streaming, batched sessions, model-level state."""

from __future__ import annotations

import pytest
import torch

from memory_models.model import ModelState, SequenceModel, SequenceModelConfig
from memory_models.registry import REGISTRY

KINDS = list(REGISTRY)


def tiny_model(kind: str, dtype=torch.float64) -> SequenceModel:
    config = SequenceModelConfig(
        vocab_size=37, d_model=32, n_layers=2, memory={"kind": kind, "memory_size": 8}
    )
    return config.build().to(dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_shape_and_state_per_block(kind):
    model = tiny_model(kind, torch.float32)
    tokens = torch.randint(0, 37, (3, 19))
    logits, state = model(tokens)
    assert logits.shape == (3, 19, 37)
    assert isinstance(state, ModelState) and len(state.layers) == 2
    assert state.nbytes_per_sequence() <= model.state_size_bytes(19)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_in_pieces_matches_the_reference_model(kind):
    model = tiny_model(kind)
    tokens = torch.randint(0, 37, (2, 25))
    pieces = [9, 1, 15]
    fast_state = ref_state = None
    start = 0
    with torch.no_grad():
        for size in pieces:
            piece = tokens[:, start : start + size]
            fast, fast_state = model(piece, fast_state)
            ref, ref_state = model.reference_forward(piece, ref_state)
            torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)
            start += size


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decoding_equals_full_forward(kind):
    model = tiny_model(kind)
    tokens = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        full, _ = model(tokens)
        state, steps = None, []
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_model_state_batches_sessions(kind):
    model = tiny_model(kind)
    with torch.no_grad():
        states = [model(torch.randint(0, 37, (1, n)))[1] for n in (4, 13)]
        stacked = ModelState.stack(states)
        assert stacked.batch_size == 2
        step = torch.randint(0, 37, (2, 3))
        batched, _ = model(step, stacked)
        for i, part in enumerate(stacked.split(1)):
            alone, _ = model(step[i : i + 1], part)
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-9, rtol=0)


def test_head_is_tied_to_embedding():
    model = tiny_model("gru", torch.float32)
    assert model.head.weight is model.embedding.weight
