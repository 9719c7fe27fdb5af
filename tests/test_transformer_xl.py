"""Transformer-XL memory: fast path == per-pair reference, detached cache, relative positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    assert_fast_matches_reference,
    assert_states_close,
    randn,
    run_chunks,
    warm_state,
    with_config,
)
from pydantic import ValidationError

from memory_models.transformer_xl import (
    TransformerXLConfig,
    TransformerXLLayer,
    TransformerXLState,
)

D_MODEL = 16
MEMORY_SIZE = 8


def make_layer(
    threshold: float = 0.0, memory_size: int = MEMORY_SIZE, d_model: int = D_MODEL, n_heads: int = 4
) -> TransformerXLLayer:
    config = TransformerXLConfig(
        memory_size=memory_size, forget_threshold=threshold, n_heads=n_heads
    )
    return config.build(d_model).double()


@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("length", [1, 33, 63])
def test_fast_matches_reference_outputs_state_and_gradients(length, threshold):
    layer = make_layer(threshold)
    state = warm_state(layer, 2, 11)
    x = randn(2, length, D_MODEL).requires_grad_()
    y_fast, s_fast = layer(x, state)
    y_ref, s_ref = layer.reference_forward(x, state)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-9, rtol=0)
    assert_states_close(s_fast, s_ref)

    weights = torch.randn_like(y_fast)
    inputs = [x, *layer.parameters()]
    grads_fast = torch.autograd.grad((y_fast * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), inputs)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_streaming_chunks_match_reference_on_same_chunks(threshold):
    layer = make_layer(threshold, memory_size=5)
    chunks = [1, 1, 7, 1, 13, 2]
    x = randn(3, sum(chunks), D_MODEL)
    assert_fast_matches_reference(layer, x, chunks)


@pytest.mark.parametrize(("d_model", "n_heads"), [(10, 4), (9, 2), (8, 1)])
def test_widths_that_do_not_divide_into_heads(d_model, n_heads):
    layer = make_layer(d_model=d_model, n_heads=n_heads)
    x = randn(2, 12, d_model)
    assert_fast_matches_reference(layer, x, [5, 7])


def test_memory_holds_the_last_layer_inputs_with_their_positions():
    layer = make_layer()
    x = randn(2, 12, D_MODEL)
    _, state = run_chunks(layer, x, None, [5, 7])
    assert torch.equal(state.memory, x[:, 4:12])
    assert torch.equal(state.positions, torch.arange(4, 12).expand(2, -1))
    assert state.valid.all()
    assert torch.equal(state.position, torch.tensor([12, 12]))
    assert torch.equal(state.evictions, torch.tensor([4, 4]))
    assert state.metrics()["evictions"] == 4.0


def test_memory_receives_no_gradient():
    layer = make_layer()
    first = randn(2, 9, D_MODEL).requires_grad_()
    second = randn(2, 4, D_MODEL).requires_grad_()
    _, state = layer(first)
    assert not any(t.requires_grad for t in state.tensors().values())
    y, _ = layer(second, state)
    grad_first, grad_second = torch.autograd.grad(y.sum(), [first, second], allow_unused=True)
    assert grad_first is None or torch.count_nonzero(grad_first) == 0
    assert torch.count_nonzero(grad_second) > 0


def test_every_live_memory_entry_is_read():
    """The cache is attended in full: changing the oldest cached input changes the first output."""
    layer = make_layer()
    state = warm_state(layer, 1, 20)
    x = randn(1, 3, D_MODEL)
    y, _ = layer(x, state)
    changed = dataclasses.replace(state, memory=state.memory.clone())
    changed.memory[:, 0] += 1.0
    y_changed, _ = layer(x, changed)
    assert (y_changed[:, 0] - y[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_outputs_depend_only_on_relative_positions(threshold):
    layer = make_layer(threshold)
    state = warm_state(layer, 2, 30)
    shift = 1000
    shifted = dataclasses.replace(
        state,
        positions=torch.where(state.valid, state.positions + shift, 0),
        position=state.position + shift,
    )
    x = randn(2, 6, D_MODEL)
    y, new_state = layer(x, state)
    y_shifted, new_shifted = layer(x, shifted)
    torch.testing.assert_close(y_shifted, y, atol=1e-9, rtol=0)
    torch.testing.assert_close(new_shifted.memory, new_state.memory, atol=1e-9, rtol=0)
    assert torch.equal(new_shifted.valid, new_state.valid)
    assert torch.equal(
        new_shifted.positions[new_state.valid], new_state.positions[new_state.valid] + shift
    )


def test_distance_of_a_cached_entry_changes_its_score():
    """Positions are real inputs: moving one entry further back (a hole) changes the output."""
    layer = make_layer()
    state = warm_state(layer, 1, 20)
    older = state.positions.clone()
    older[:, 0] -= 5
    x = randn(1, 4, D_MODEL)
    y, _ = layer(x, state)
    y_older, _ = layer(x, dataclasses.replace(state, positions=older))
    y_older_ref, _ = layer.reference_forward(x, dataclasses.replace(state, positions=older))
    assert (y_older - y).abs().max() > 1e-6
    torch.testing.assert_close(y_older, y_older_ref, atol=1e-9, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(1, 6),
    threshold=st.sampled_from([0.0, 0.05, 0.3]),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_live_entries_never_exceed_memory_size(memory_size, threshold, chunks, seed):
    torch.manual_seed(seed)
    layer = make_layer(threshold, memory_size=memory_size, d_model=8, n_heads=2)
    state = None
    with torch.no_grad():
        for size in chunks:
            _, state = layer(3 * randn(2, size, 8), state)
            assert (state.live_entries() <= memory_size).all()
            assert state.valid.shape[1] <= memory_size


@settings(max_examples=10, deadline=None)
@given(
    thresholds=st.lists(st.floats(0.0, 0.6), min_size=2, max_size=2),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_raising_the_threshold_never_keeps_more_entries(thresholds, steps, seed):
    torch.manual_seed(seed)
    low_threshold, high_threshold = sorted(thresholds)
    low = make_layer(low_threshold, memory_size=6, d_model=8, n_heads=2)
    high = with_config(low, forget_threshold=high_threshold)
    state = warm_state(with_config(low, forget_threshold=0.0), 3, 10)
    x = randn(3, steps, 8)
    with torch.no_grad():
        _, kept_low = low(x, state)
        _, kept_high = high(x, state)
    assert (kept_high.live_entries() <= kept_low.live_entries()).all()


def test_threshold_keeps_exactly_the_entries_attended_enough():
    """With room for everything, the kept entries are those whose chunk share reaches the bar."""
    layer = make_layer(memory_size=100)
    state = warm_state(layer, 2, 9)
    x = randn(2, 5, D_MODEL)
    with torch.no_grad():
        _, everything = layer(x, state)
        threshold = everything.share.median().item()
        _, thresholded = with_config(layer, forget_threshold=threshold)(x, state)
    assert everything.valid.all()
    for b in range(2):
        expected = everything.positions[b][everything.share[b] >= threshold]
        assert torch.equal(thresholded.positions[b][thresholded.valid[b]], expected)
    assert 0 < thresholded.valid.sum() < everything.valid.sum()
    candidates = 9 + 5
    assert torch.equal(thresholded.evictions, candidates - thresholded.live_entries())


@pytest.mark.parametrize("threshold", [0.0, 0.15])
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold)
    states = [warm_state(layer, 1, n) for n in (2, 20, 5)]
    assert len({s.memory.shape[1] for s in states}) > 1
    step = randn(3, 4, D_MODEL)
    with torch.no_grad():
        y_batched, s_batched = layer(step, TransformerXLState.stack(states))
        for i, (state, back) in enumerate(zip(states, s_batched.split(1), strict=True)):
            y_alone, s_alone = layer(step[i : i + 1], state)
            torch.testing.assert_close(y_batched[i : i + 1], y_alone, atol=1e-9, rtol=0)
            live = back.valid[0]
            assert torch.equal(live.sum(), s_alone.valid.sum())
            torch.testing.assert_close(back.memory[0, live], s_alone.memory[0][s_alone.valid[0]])
            assert torch.equal(back.positions[0, live], s_alone.positions[0][s_alone.valid[0]])
            assert torch.equal(back.evictions, s_alone.evictions)


@pytest.mark.parametrize("chunks", [[13], [3, 1, 9], [1] * 6 + [7]])
def test_state_size_bytes_counts_every_tensor(chunks):
    layer = TransformerXLConfig(memory_size=MEMORY_SIZE).build(D_MODEL)
    with torch.no_grad():
        _, state = run_chunks(layer, torch.randn(2, sum(chunks), D_MODEL), None, chunks)
    assert layer.state_size_bytes(sum(chunks), torch.float32) == state.nbytes_per_sequence()
    assert state.memory.dtype == torch.float32 and state.share.dtype == torch.float32


@pytest.mark.parametrize(
    ("override", "field"),
    [({"n_heads": 0}, "n_heads"), ({"memory_size": 0}, "memory_size"), ({"mem_len": 4}, "mem_len")],
)
def test_bad_configs_name_the_field(override, field):
    with pytest.raises(ValidationError) as error:
        TransformerXLConfig(**override)
    assert field in str(error.value)
