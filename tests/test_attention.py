"""Attention memory: fast == per-query reference, sliding window, eviction by attention share."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    UNEVEN_CHUNKS,
    assert_chunked_equals_full,
    assert_empty_slots_change_nothing,
    assert_fast_matches_reference,
    assert_higher_threshold_never_keeps_more,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    randn,
    run_chunks,
    streamed_states,
    warm_state,
    warm_states,
    with_config,
)

from memory_models.attention import AttentionConfig, AttentionLayer
from memory_models.common import rotary

D_MODEL = 16
WINDOW = 8
# (memory_size, forget_threshold): full context, sliding window, and both with eviction by share.
SETTINGS = [(None, 0.0), (WINDOW, 0.0), (None, 0.2), (WINDOW, 0.2)]


def make_layer(memory_size: int | None = WINDOW, threshold: float = 0.0) -> AttentionLayer:
    config = AttentionConfig(memory_size=memory_size, forget_threshold=threshold, n_heads=2)
    return config.build(D_MODEL).double()


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize(("memory_size", "threshold"), SETTINGS)
def test_fast_matches_reference(memory_size, threshold, steps):
    layer = make_layer(memory_size, threshold)
    # A non-empty cache, so cache and chunk keys both matter.
    warm = warm_state(layer, 2, 11)
    x = randn(2, steps, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=warm, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize(("memory_size", "threshold"), SETTINGS)
def test_fast_matches_reference_streaming_in_uneven_chunks(memory_size, threshold):
    layer = make_layer(memory_size, threshold)
    x = randn(3, 40, D_MODEL)
    chunks = [1, 1, 9, 3, 17, 1, 8]
    assert_fast_matches_reference(layer, x, chunks)


@pytest.mark.parametrize("memory_size", [None, WINDOW])
def test_chunked_equals_full_pass_at_threshold_zero(memory_size):
    layer = make_layer(memory_size)
    assert layer.chunk_invariant()
    x = randn(2, 33, D_MODEL).requires_grad_()
    # The cache keeps its autograd history, so gradients agree across chunkings too.
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS, gradients=[x])


def test_threshold_makes_the_layer_chunk_dependent():
    assert not make_layer(WINDOW, 0.2).chunk_invariant()
    assert not make_layer(None, 0.2).chunk_invariant()


def test_sliding_window_sees_exactly_the_last_memory_size_tokens():
    layer = make_layer(WINDOW)
    x = randn(1, 30, D_MODEL)
    t = 20
    y, _ = run_chunks(layer, x, None, [7, 13, 10])
    outside, inside = x.clone(), x.clone()
    outside[:, : t - WINDOW + 1] = torch.randn_like(outside[:, : t - WINDOW + 1])
    inside[:, t - WINDOW + 1] += 1.0
    y_outside, _ = run_chunks(layer, outside, None, [7, 13, 10])
    y_inside, _ = run_chunks(layer, inside, None, [7, 13, 10])
    torch.testing.assert_close(y_outside[:, t], y[:, t], atol=1e-12, rtol=0)
    assert (y_inside[:, t] - y[:, t]).abs().max() > 1e-6


def test_full_context_sees_the_first_token():
    layer = make_layer(None)
    x = randn(1, 40, D_MODEL)
    changed = x.clone()
    changed[:, 0] += 1.0
    y, state = run_chunks(layer, x, None, [1, 20, 19])
    y_changed, _ = run_chunks(layer, changed, None, [1, 20, 19])
    assert (y_changed[:, -1] - y[:, -1]).abs().max() > 1e-6
    assert state.live_entries().tolist() == [40] and state.evictions.tolist() == [0]


@pytest.mark.parametrize("memory_size", [None, WINDOW])
def test_state_size_bytes_is_exact_at_threshold_zero(memory_size):
    layer = make_layer(memory_size)
    for seq_len, chunks in [(1, [1]), (8, [3, 5]), (33, [5, 1, 11, 16])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, seq_len, D_MODEL), None, chunks)
        expected = layer.state_size_bytes(seq_len, torch.float64)
        assert state.nbytes_per_sequence() == expected
        assert state.positions.tolist()[0] == list(range(seq_len - state.keys.shape[1], seq_len))


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 0.7]),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_live_entries_never_exceed_memory_size(memory_size, threshold, chunks, scale):
    layer = make_layer(memory_size, threshold)
    for state in streamed_states(layer, chunks, batch=3, scale=scale):
        assert (state.live_entries() <= memory_size).all()
        assert state.valid.sum(1).equal(state.live_entries())


@pytest.mark.parametrize("memory_size", [None, WINDOW])
def test_higher_threshold_never_keeps_more(memory_size):
    base = make_layer(memory_size)
    warm = warm_state(base, 4, 13)
    assert_higher_threshold_never_keeps_more(base, randn(4, 19, D_MODEL), warm)


def oracle_share(layer: AttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """`[B, T]` share of each token in one call from the empty state, written out independently.

    From an empty cache the documented visibility is the sliding window `t - W < s <= t`.
    """
    batch, steps, _ = x.shape
    heads, dim = layer.n_heads, layer.head_dim
    positions = torch.arange(steps).expand(batch, steps)
    q, k, _ = layer.qkv(x).view(batch, steps, 3, heads, dim).unbind(2)
    q, k = (
        rotary(q, positions, layer.config.rope_base),
        rotary(k, positions, layer.config.rope_base),
    )
    t = torch.arange(steps)
    visible = (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < layer.config.memory_size)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs.mean(1).amax(1)


@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.25])
def test_the_most_attended_entries_are_kept(threshold):
    layer = make_layer(WINDOW, threshold)
    x = 2.0 * randn(3, 30, D_MODEL)
    with torch.no_grad():
        share = oracle_share(layer, x)
        _, state = layer(x)
    for b in range(3):
        kept = state.positions[b][state.valid[b]].tolist()
        evicted = sorted(set(range(30)) - set(kept))
        torch.testing.assert_close(
            state.share[b][state.valid[b]], share[b, kept], atol=1e-12, rtol=0
        )
        assert (share[b, kept] >= threshold).all()
        candidates = [p for p in evicted if share[b, p] >= threshold]
        if candidates:
            # Over capacity: everything kept got at least as much attention as anything dropped.
            assert len(kept) == WINDOW
            assert share[b, kept].min() >= share[b, candidates].max()
    assert (state.evictions == 30 - state.live_entries()).all()


def test_threshold_without_window_keeps_exactly_the_entries_above_it():
    tracker = make_layer(None, 1e-12)  # tracks shares, evicts nothing (every share is > 0)
    strict = with_config(tracker, forget_threshold=0.15)
    x = randn(2, 25, D_MODEL)
    with torch.no_grad():
        _, everything = tracker(x)
        _, state = strict(x)
    assert everything.live_entries().tolist() == [25, 25]
    for b in range(2):
        above = everything.share[b] >= 0.15
        assert state.positions[b][state.valid[b]].tolist() == torch.arange(25)[above].tolist()


@pytest.mark.parametrize(("memory_size", "threshold"), SETTINGS)
def test_padded_batch_equals_each_sequence_alone(memory_size, threshold):
    layer = make_layer(memory_size, threshold)
    states = warm_states(layer, (2, 17, 9))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 5, D_MODEL))


def test_extra_zero_slots_change_nothing():
    layer = make_layer(WINDOW, 0.1)
    state = warm_state(layer, 2, 12)
    assert_empty_slots_change_nothing(layer, state, randn(2, 6, D_MODEL))


def test_float32_state_and_metrics():
    layer = AttentionConfig(memory_size=4, forget_threshold=0.1).build(32)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, state = layer(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and state.keys.dtype == torch.float32
    assert state.positions.dtype == torch.long and state.valid.dtype == torch.bool
    metrics = state.metrics()
    assert set(metrics) == {"live_entries", "evictions"}
    assert metrics["evictions"] == 9 - metrics["live_entries"]


def test_config_defaults_and_json():
    config = AttentionConfig()
    assert config.memory_size is None and config.n_heads == 4
    assert AttentionConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"rope_base": 1.0}, "rope_base"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"window": 4}, "window"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(AttentionConfig, fields, name)
