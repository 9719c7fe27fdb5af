"""Transformer-XL memory: fast path == per-pair reference, detached cache, relative positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    assert_fast_matches_reference,
    assert_first_slot_is_read,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_state_is_detached,
    randn,
    run_chunks,
    streamed_states,
    warm_state,
    warm_states,
    with_config,
)

from memory_models.transformer_xl import TransformerXLConfig, TransformerXLLayer

D_MODEL = 16
MEMORY_SIZE = 8


SEGMENT = 4


def make_layer(
    threshold: float = 0.0, memory_size: int = MEMORY_SIZE, d_model: int = D_MODEL, n_heads: int = 4
) -> TransformerXLLayer:
    config = TransformerXLConfig(
        memory_size=memory_size, forget_threshold=threshold, n_heads=n_heads, segment_len=SEGMENT
    )
    return config.build(d_model).double()


@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("length", [1, 33, 63])
def test_fast_matches_reference_outputs_state_and_gradients(length, threshold):
    layer = make_layer(threshold)
    state = warm_state(layer, 2, 11)
    x = randn(2, length, D_MODEL).requires_grad_()
    gradients = [x, *layer.parameters()]
    assert_fast_matches_reference(layer, x, state=state, gradients=gradients, unused="error")


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_streaming_chunks_match_reference_on_same_chunks(threshold):
    layer = make_layer(threshold, memory_size=5)
    chunks = [1, 1, 7, 1, 13, 2]
    x = randn(3, sum(chunks), D_MODEL)
    assert_fast_matches_reference(layer, x, chunks)


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
    assert_state_is_detached(make_layer(), first_len=2 * SEGMENT)


def test_every_live_memory_entry_is_read():
    """The cache is attended in full: changing the oldest cached input changes the first output."""
    layer = make_layer()
    state = warm_state(layer, 1, 20)
    assert_first_slot_is_read(layer, state, randn(1, 3, D_MODEL), "memory")


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
    for state in streamed_states(layer, chunks, batch=2, scale=3.0):
        assert (state.live_entries() <= memory_size).all()
        assert state.valid.shape[1] <= memory_size


def test_threshold_keeps_exactly_the_entries_attended_enough():
    """With room for everything, the kept entries are those whose segment share reaches the
    bar."""
    layer = make_layer(memory_size=100)
    state = warm_state(layer, 2, 2 * SEGMENT)
    x = randn(2, SEGMENT, D_MODEL)  # one segment: every entry judged once, by its queries
    with torch.no_grad():
        _, everything = layer(x, state)
        threshold = everything.share.median().item()
        _, thresholded = with_config(layer, forget_threshold=threshold)(x, state)
    assert everything.valid.all()
    for b in range(2):
        expected = everything.positions[b][everything.share[b] >= threshold]
        assert torch.equal(thresholded.positions[b][thresholded.valid[b]], expected)
    assert 0 < thresholded.valid.sum() < everything.valid.sum()
    candidates = 3 * SEGMENT
    assert torch.equal(thresholded.evictions, candidates - thresholded.live_entries())


@pytest.mark.parametrize("threshold", [0.0, 0.15])
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold)
    states = warm_states(layer, (2, 20, 5))
    assert len({s.memory.shape[1] for s in states}) > 1
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 4, D_MODEL))


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
    assert_refused_naming(TransformerXLConfig, override, field)
