"""Attention memory: fast == per-query reference, sliding window, eviction by attention share."""

from __future__ import annotations

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
)

from memory_models.attention import AttentionConfig, AttentionLayer

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


@pytest.mark.parametrize(("memory_size", "threshold"), SETTINGS)
def test_chunked_equals_full_pass_at_every_threshold(memory_size, threshold):
    layer = make_layer(memory_size, threshold)
    x = randn(2, 33, D_MODEL).requires_grad_()
    # The cache keeps its autograd history, so gradients agree across chunkings too.
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS, gradients=[x])


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


def test_threshold_drops_every_entry_under_it_before_the_next_token():
    """Per token: whatever else the policy does, an entry whose share is under the threshold
    when the next token arrives is gone; only the newest token is not judged yet."""
    layer = make_layer(None, 0.15)
    x = randn(2, 25, D_MODEL)
    for chunks in ([25], [1] * 25, [7, 18]):
        with torch.no_grad():
            _, state = run_chunks(layer, x, None, chunks)
        for b in range(2):
            judged = state.valid[b] & (state.positions[b] < 24)
            assert (state.share[b][judged] >= 0.15).all()
        assert (state.evictions == 25 - state.live_entries()).all()


@pytest.mark.parametrize("policy", ["threshold", "tova"])
def test_a_full_cache_drops_the_entry_with_the_lowest_statistic(policy):
    layer = policy_layer(policy)
    warm = warm_state(layer, 3, 20)
    assert (warm.live_entries() == WINDOW).all()
    with torch.no_grad():
        _, state = layer(randn(3, 1, D_MODEL), warm)
    for b in range(3):
        held = warm.positions[b][warm.valid[b]]
        lowest = held[warm.share[b][warm.valid[b]].argmin()].item()
        kept = set(state.positions[b][state.valid[b]].tolist())
        assert kept == (set(held.tolist()) - {lowest}) | {20}


def test_h2o_keeps_the_recent_half_and_the_heaviest_of_the_rest():
    layer = policy_layer("h2o")
    warm = warm_state(layer, 3, 20)
    room = WINDOW - 1
    with torch.no_grad():
        _, state = layer(randn(3, 1, D_MODEL), warm)
    for b in range(3):
        kept = state.positions[b][state.valid[b]].tolist()
        assert set(range(20 - room // 2, 21)) <= set(kept)
        held = warm.positions[b][warm.valid[b]]
        older = held < 20 - room // 2
        dropped = set(held.tolist()) - set(kept)
        heavy = warm.share[b][warm.valid[b]]
        assert len(dropped) == 1 and older[held == next(iter(dropped))].item()
        assert heavy[held == next(iter(dropped))].item() == heavy[older].min().item()


def test_sinks_see_the_first_tokens_and_a_window_of_the_rest():
    layer = policy_layer("sinks", sinks=2)
    x = randn(1, 30, D_MODEL)
    t = 25
    y, state = run_chunks(layer, x, None, [7, 13, 10])
    assert state.positions[0][state.valid[0]].tolist() == [0, 1, *range(30 - WINDOW + 2, 30)]

    def output_at_t_after_changing(position: int) -> torch.Tensor:
        other = x.clone()
        other[:, position] += 1.0
        return layer(other)[0][:, t]

    # Seen: the two sinks and the newest WINDOW - 2 tokens up to t.
    for seen in (0, 1, t - WINDOW + 3):
        assert (output_at_t_after_changing(seen) - y[:, t]).abs().max().item() > 1e-6
    for unseen in (2, t - WINDOW + 2):
        torch.testing.assert_close(output_at_t_after_changing(unseen), y[:, t], atol=1e-12, rtol=0)


@pytest.mark.parametrize("policy", ["sinks", "threshold", "h2o", "tova"])
def test_every_policy_streams_like_the_whole_pass_and_its_reference(policy):
    layer = policy_layer(policy, threshold=0.05)
    x = randn(3, 33, D_MODEL).requires_grad_()
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS, gradients=[x])
    assert_fast_matches_reference(layer, x, [1, 9, 23], gradients=[x, *layer.parameters()])
    for state in streamed_states(layer, [5, 1, 30], batch=3, scale=3.0):
        assert (state.live_entries() <= WINDOW).all()


def test_policies_that_need_a_bound_refuse_full_context():
    assert_refused_naming(AttentionConfig, {"eviction": "tova", "memory_size": None}, "memory_size")
    assert_refused_naming(AttentionConfig, {"eviction": "sinks", "memory_size": 4}, "sinks")


def policy_layer(policy: str, threshold: float = 0.0, **fields) -> AttentionLayer:
    config = AttentionConfig(
        memory_size=WINDOW, forget_threshold=threshold, n_heads=2, eviction=policy, **fields
    )
    return config.build(D_MODEL).double()


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
    assert set(metrics) == {"live_entries", "evictions", "evictions_per_token"}
    assert metrics["evictions_per_token"] == pytest.approx(metrics["evictions"] / 9)
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
