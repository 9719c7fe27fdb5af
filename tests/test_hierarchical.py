"""Hierarchical attention: fast == per-token reference, visibility, HAN pooling, eviction."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import (
    adam_losses,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_finite,
    assert_higher_threshold_never_keeps_more,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_states_close,
    randn,
    run_chunks,
    streamed_states,
    warm_states,
    with_config,
)

from memory_models.hierarchical import HierarchicalConfig, HierarchicalLayer, HierarchicalState

D_MODEL = 16
SEGMENT = 4
SUMMARIES = 3
THRESHOLDS = [0.0, 0.2]


def make_layer(
    threshold: float = 0.0, memory_size: int = SUMMARIES, segment_len: int = SEGMENT
) -> HierarchicalLayer:
    config = HierarchicalConfig(
        memory_size=memory_size, forget_threshold=threshold, segment_len=segment_len, n_heads=2
    )
    return config.build(D_MODEL).double()


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize("warm_tokens", [0, 11])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_fast_matches_reference(threshold, warm_tokens, steps):
    layer = make_layer(threshold)
    warm = None
    if warm_tokens:
        with torch.no_grad():
            # 11 tokens: two closed segments in the bank and three open-segment inputs.
            _, warm = layer(randn(2, warm_tokens, D_MODEL))
    x = randn(2, steps, D_MODEL).requires_grad_()
    # An input or weight one path does not use counts as a zero gradient.
    gradients = [x, *layer.parameters()]
    assert_fast_matches_reference(layer, x, state=warm, gradients=gradients, unused="zero")


@pytest.mark.parametrize("chunks", [[1, 1, 9, 3, 17, 1, 8], [3] * 13 + [1], [40]])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_fast_matches_reference_in_chunks_that_cut_segments(threshold, chunks):
    layer = make_layer(threshold)
    x = randn(3, sum(chunks), D_MODEL).requires_grad_()
    gradients = [x, *layer.parameters()]
    assert_fast_matches_reference(layer, x, chunks, gradients=gradients, unused="zero")


def test_chunked_equals_full_pass_at_threshold_zero():
    layer = make_layer()
    x = randn(2, 33, D_MODEL).requires_grad_()
    for chunks in ([5, 1, 11, 16], [3] * 11, [2, 31]):
        # Open inputs and summaries keep their autograd history: gradients agree too.
        gradients = [x, *layer.parameters()]
        assert_chunked_equals_full(layer, x, chunks, gradients=gradients, unused="zero")


def test_pooling_weights_sum_to_one_and_a_dominant_token_wins():
    layer = make_layer()
    summary, weights = layer.pool(randn(5, 3, SEGMENT, D_MODEL))
    assert summary.shape == (5, 3, D_MODEL) and weights.shape == (5, 3, SEGMENT)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 3, dtype=torch.float64))
    assert (weights > 0).all()

    # u_t = tanh(W h_t + b) reads coordinate 0; u_w scores it: the token with h[0] = +1 dominates.
    with torch.no_grad():
        layer.pool_proj.weight.zero_()
        layer.pool_proj.bias.zero_()
        layer.pool_proj.weight[0, 0] = 10.0
        layer.pool_context.zero_()
        layer.pool_context[0] = 100.0
    tokens = randn(SEGMENT, D_MODEL)
    tokens[:, 0] = -1.0
    tokens[2, 0] = 1.0
    summary, weights = layer.pool(tokens)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(summary, tokens[2], atol=1e-12, rtol=0)
    ref_summary, _ = layer._reference_pool(list(tokens))
    torch.testing.assert_close(ref_summary, summary, atol=1e-12, rtol=0)

    # A context vector of zeros scores every token alike: the summary is the mean.
    with torch.no_grad():
        layer.pool_context.zero_()
    summary, _ = layer.pool(tokens)
    torch.testing.assert_close(summary, tokens.mean(0), atol=1e-12, rtol=0)


def dependence(layer: HierarchicalLayer, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """`[T, T]` bool: output t changes when input s is perturbed."""
    steps = x.shape[1]
    with torch.no_grad():
        y, _ = run_chunks(layer, x, None, chunks)
        depends = torch.zeros(steps, steps, dtype=torch.bool)
        for s in range(steps):
            changed = x.clone()
            changed[:, s] += 1.0
            y_changed, _ = run_chunks(layer, changed, None, chunks)
            depends[:, s] = (y_changed - y).abs().amax(dim=(0, 2)) > 1e-10
    return depends


@pytest.mark.parametrize("chunks", [[24], [5, 7, 12], [1] * 24])
def test_a_query_sees_its_segment_so_far_and_the_newest_closed_summaries(chunks):
    layer = make_layer(memory_size=2)
    depends = dependence(layer, randn(1, 24, D_MODEL), chunks)
    t = torch.arange(24)
    own = t[:, None] // SEGMENT == t[None, :] // SEGMENT
    earlier = t[:, None] >= t[None, :]
    gap = t[:, None] // SEGMENT - t[None, :] // SEGMENT  # segments between query and key
    summarised = (gap >= 1) & (gap <= 2)  # the memory_size = 2 newest closed segments
    assert torch.equal(depends, (own & earlier) | summarised)


def test_without_summary_projections_segments_are_independent():
    layer = make_layer()
    with torch.no_grad():
        layer.summary_kv.weight.zero_()
    depends = dependence(layer, randn(1, 16, D_MODEL), [3, 6, 7])
    t = torch.arange(16)
    own = t[:, None] // SEGMENT == t[None, :] // SEGMENT
    assert torch.equal(depends, own & (t[:, None] >= t[None, :]))


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("steps", [256, 1024])
def test_state_is_bounded(threshold, steps):
    layer = make_layer(threshold).float()
    bound = (SEGMENT - 1) * D_MODEL * 4 + SUMMARIES * (D_MODEL * 4 + 8 + 1 + 4) + 16
    for state in streamed_states(layer, [64] * (steps // 64), batch=2, scale=3.0):
        assert (state.live_entries() <= SUMMARIES).all()
        assert state.open_inputs.shape[1] <= SEGMENT - 1
        assert state.nbytes_per_sequence() <= bound
    assert layer.state_size_bytes(steps, torch.float32) <= bound
    if threshold == 0.0:
        assert state.nbytes_per_sequence() == layer.state_size_bytes(steps, torch.float32)
        assert state.evictions.tolist() == [steps // SEGMENT - SUMMARIES] * 2


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_state_size_bytes_counts_the_state(threshold):
    layer = make_layer(threshold)
    for seq_len, chunks in [(1, [1]), (4, [4]), (11, [3, 8]), (33, [5, 1, 11, 16])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, seq_len, D_MODEL), None, chunks)
        expected = layer.state_size_bytes(seq_len, torch.float64)
        if threshold == 0.0:
            assert state.nbytes_per_sequence() == expected, seq_len
        else:
            assert state.nbytes_per_sequence() <= expected, seq_len


def test_threshold_zero_keeps_the_newest_segments_and_the_open_inputs():
    layer = make_layer()
    x = randn(2, 30, D_MODEL)
    with torch.no_grad():
        _, state = run_chunks(layer, x, None, [7, 13, 10])
    # 30 tokens: segments 0..6 closed and the newest 3 stay; tokens 28 and 29 are open.
    assert state.segments.tolist() == [[4, 5, 6]] * 2
    assert state.evictions.tolist() == [4, 4] and state.position.tolist() == [30, 30]
    torch.testing.assert_close(state.open_inputs, x[:, 28:], atol=0, rtol=0)
    for b in range(2):
        for slot, segment in enumerate(state.segments[b].tolist()):
            expected, _ = layer.pool(x[b, SEGMENT * segment : SEGMENT * (segment + 1)])
            torch.testing.assert_close(state.summaries[b, slot], expected, atol=1e-12, rtol=0)


def uniform_attention_layer(threshold: float, memory_size: int) -> HierarchicalLayer:
    """Queries and keys of zero: every query spreads its attention evenly over what it sees."""
    layer = make_layer(threshold, memory_size=memory_size)
    with torch.no_grad():
        layer.qkv.weight.zero_()
    return layer


def four_summaries(shares: list[float]) -> HierarchicalState:
    """A bank of segments 0..3 with the given shares, at position 16 (no open segment)."""
    return HierarchicalState(
        open_inputs=torch.zeros(1, 0, D_MODEL, dtype=torch.float64),
        summaries=randn(1, 4, D_MODEL),
        segments=torch.arange(4)[None],
        valid=torch.ones(1, 4, dtype=torch.bool),
        share=torch.tensor([shares], dtype=torch.float64),
        position=torch.tensor([16]),
        evictions=torch.tensor([0]),
    )


@pytest.mark.parametrize(
    ("threshold", "segments", "shares"),
    [
        # Under the threshold: segments 1 and 3 (share 0.2) go; the new segment 4 is exempt.
        (0.25, [0, 2, 4], [0.5, 0.3, 0.0]),
        # All four are above it, five exceed memory_size 4: of the two lowest (0.2) the older goes.
        (0.1, [0, 2, 3, 4], [0.5, 0.3, 0.2, 0.0]),
    ],
)
def test_eviction_by_share_then_lowest_first(threshold, segments, shares):
    layer = uniform_attention_layer(threshold, memory_size=4)
    # The first query of segment 4 sees 4 summaries and itself: each summary gets 1/5 = 0.2.
    state = four_summaries([0.5, 0.05, 0.3, 0.01])
    x = randn(1, 4, D_MODEL)
    with torch.no_grad():
        _, after = layer(x, state)
        _, after_ref = layer.reference_forward(x, state)
    assert after.segments.tolist() == [segments]
    torch.testing.assert_close(after.share, torch.tensor([shares], dtype=torch.float64))
    assert after.evictions.tolist() == [5 - len(segments)]
    assert_states_close(after, after_ref)


def test_the_newest_summary_waits_for_the_next_segment_to_be_judged():
    layer = uniform_attention_layer(0.9, memory_size=4)
    with torch.no_grad():
        _, state = layer(randn(1, 8, D_MODEL))
        # Segment 0 got 1/2 from the first query of segment 1 and went; segment 1 closed unread.
        assert state.segments.tolist() == [[1]] and state.share.tolist() == [[0.0]]
        _, state = layer(randn(1, 3, D_MODEL), state)
        assert state.segments.tolist() == [[1]]  # still the newest: not judged yet
        _, state = layer(randn(1, 1, D_MODEL), state)
        assert state.segments.tolist() == [[2]] and state.evictions.tolist() == [2]


def test_higher_threshold_never_keeps_more():
    base = make_layer(memory_size=6)
    with torch.no_grad():
        _, warm = with_config(base, forget_threshold=1e-12)(randn(4, 13, D_MODEL))
    x, thresholds = 2.0 * randn(4, 19, D_MODEL), (1e-12, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8)
    live = assert_higher_threshold_never_keeps_more(base, x, warm, thresholds)
    assert (live[-1] >= 1).all(), "the newest summary always stays"


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold)
    # Different open segments (2, 1, 0 tokens) and bank sizes (empty, capped, filling).
    states = warm_states(layer, (2, 17, 12))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 6, D_MODEL))


def test_float32_stays_finite_and_learns():
    torch.manual_seed(1)
    layer = HierarchicalConfig(memory_size=8, segment_len=16).build(32)
    state = None
    with torch.no_grad():
        for _ in range(8):
            y, state = layer(torch.randn(2, 64, 32), state)
            assert_finite(y, state)

    x, target = torch.randn(4, 48, 32), torch.randn(4, 48, 32)
    losses = adam_losses(layer, x, target, steps=6)
    assert losses[-1] < losses[0]


def test_metrics_and_dtypes():
    layer = HierarchicalConfig(memory_size=2, segment_len=4, forget_threshold=0.1).build(16)
    _, state = layer(torch.randn(2, 17, 16))
    assert state.summaries.dtype == torch.float32 and state.segments.dtype == torch.long
    assert state.valid.dtype == torch.bool and state.open_inputs.shape == (2, 1, 16)
    assert set(state.metrics()) == {"live_entries", "evictions", "evictions_per_token"}


def test_config_defaults_and_json():
    config = HierarchicalConfig()
    assert (config.memory_size, config.segment_len, config.n_heads) == (16, 8, 4)
    assert HierarchicalConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": None}, "memory_size"),
        ({"segment_len": 0}, "segment_len"),
        ({"n_heads": 0}, "n_heads"),
        ({"rope_base": 1.0}, "rope_base"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"segment_length": 4}, "segment_length"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(HierarchicalConfig, fields, name)
