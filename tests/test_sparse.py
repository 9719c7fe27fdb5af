"""Sparse Transformer memory: fast == per-query reference, each pattern's reads checked by hand,
the bounded state, and eviction by attention share."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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
    warm_state,
    warm_states,
    with_config,
)

from memory_models.attention import AttentionConfig
from memory_models.sparse import SparseConfig, SparseLayer, SparseState

D_MODEL = 16
BLOCK = 4
PATTERNS = ["strided", "fixed", "longformer"]
THRESHOLDS = [0.0, 0.2]
# Small blocks so that 33..63 steps cross many blocks, the cap and chunk boundaries.
FIELDS = {"summary_len": 1, "n_global": 2, "n_heads": 2}


def make_layer(pattern: str, threshold: float = 0.0, memory_size: int = BLOCK, **fields):
    config = SparseConfig(
        pattern=pattern,
        memory_size=memory_size,
        forget_threshold=threshold,
        **{**FIELDS, **fields},
    )
    return config.build(D_MODEL).double()


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fast_matches_reference_from_a_warm_state(pattern, threshold, steps):
    layer = make_layer(pattern, threshold)
    # 11 tokens: a partial block, summaries and globals held, so state and chunk both matter.
    warm = warm_state(layer, 2, 11)
    x = randn(2, steps, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=warm, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fast_matches_reference_streaming_from_empty(pattern, threshold):
    layer = make_layer(pattern, threshold)
    x = randn(3, 40, D_MODEL).requires_grad_()
    chunks = [1, 1, 9, 3, 17, 1, 8]
    assert_fast_matches_reference(layer, x, chunks, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunked_equals_full_pass_at_threshold_zero(pattern):
    layer = make_layer(pattern)
    x = randn(2, 45, D_MODEL).requires_grad_()
    # Held keys keep their autograd history, so gradients agree across chunkings too.
    assert_chunked_equals_full(layer, x, [5, 1, 11, 16, 12], gradients=[x])


def reads_by_perturbation(layer: SparseLayer, steps: int) -> list[set[int]]:
    """`reads[i]`: the positions j whose input changes output i (each query reads itself).

    Perturbing x_j changes only key j and value j for every other query, so output i moves
    exactly when query i reads key j. The run is chunked, so held state is exercised too.
    """
    chunks = [3, 1, 10, steps - 14]
    x = randn(1, steps, D_MODEL)
    with torch.no_grad():
        y, _ = run_chunks(layer, x, None, chunks)
        reads = [{i} for i in range(steps)]
        for j in range(steps):
            moved = x.clone()
            moved[:, j] += 1.0
            y_moved, _ = run_chunks(layer, moved, None, chunks)
            changed = (y_moved - y)[0].abs().amax(-1) > 1e-9
            assert not changed[:j].any(), "causal"
            for i in range(j + 1, steps):
                if changed[i]:
                    reads[i].add(j)
    return reads


def silence_heads(layer: SparseLayer, heads: range) -> SparseLayer:
    """The same layer with the output projection cut from `heads`."""
    quiet = with_config(layer)
    with torch.no_grad():
        for h in heads:
            quiet.out.weight[:, h * layer.head_dim : (h + 1) * layer.head_dim] = 0.0
    return quiet


def test_fixed_reads_its_block_and_the_newest_summaries():
    reads = reads_by_perturbation(make_layer("fixed"), 30)
    # l = 4, c = 1: summaries are 3, 7, 11, ...; the cap keeps the newest 4 before the block.
    assert reads[26] == {11, 15, 19, 23, 24, 25, 26}
    assert reads[23] == {7, 11, 15, 19, 20, 21, 22, 23}
    assert reads[2] == {0, 1, 2}
    assert reads[5] == {3, 4, 5}
    for i in range(30):
        block = i // BLOCK * BLOCK
        summaries = [j for j in range(block) if j % BLOCK == BLOCK - 1][-BLOCK:]
        assert reads[i] == set(range(block, i + 1)) | set(summaries), i


def test_fixed_summaries_have_length_summary_len():
    reads = reads_by_perturbation(make_layer("fixed", memory_size=5, summary_len=2), 24)
    # Blocks of 5, the last 2 of each are summaries: 3, 4, 8, 9, 13, 14, 18, 19; the newest 5
    # before the query's block are kept.
    assert reads[21] == {9, 13, 14, 18, 19, 20, 21}
    assert reads[12] == {3, 4, 8, 9, 10, 11, 12}


def test_strided_heads_split_into_local_and_column():
    layer = make_layer("strided")  # two heads: head 0 local, head 1 column
    local = reads_by_perturbation(silence_heads(layer, range(1, 2)), 30)
    column = reads_by_perturbation(silence_heads(layer, range(0, 1)), 30)
    # A(1)_i = {max(0, i - l), ..., i}; A(2)_i = {j : (i - j) mod l = 0}, capped: i, i-l, i-2l.
    assert local[26] == {22, 23, 24, 25, 26}
    assert column[26] == {18, 22, 26}
    assert column[9] == {1, 5, 9}
    assert column[3] == {3}
    for i in range(30):
        assert local[i] == set(range(max(0, i - BLOCK), i + 1)), i
        assert column[i] == {j for j in (i, i - BLOCK, i - 2 * BLOCK) if j >= 0}, i


def test_longformer_reads_its_window_and_the_globals():
    reads = reads_by_perturbation(make_layer("longformer"), 30)
    assert reads[26] == {0, 1, 23, 24, 25, 26}
    assert reads[1] == {0, 1}  # a global reads every token before it
    assert reads[4] == {0, 1, 2, 3, 4}
    for i in range(30):
        assert reads[i] == set(range(max(0, i - BLOCK + 1), i + 1)) | {j for j in (0, 1) if j < i}


def test_longformer_without_globals_is_the_sliding_window_attention():
    sparse = make_layer("longformer", memory_size=6, n_global=0)
    window = AttentionConfig(memory_size=6, n_heads=2).build(D_MODEL).double()
    window.load_state_dict(sparse.state_dict())
    x = randn(2, 37, D_MODEL)
    chunks = [5, 1, 11, 20]
    y_sparse, _ = run_chunks(sparse, x, None, chunks)
    y_window, _ = run_chunks(window, x, None, chunks)
    torch.testing.assert_close(y_sparse, y_window, atol=1e-9, rtol=0)


def test_fixed_with_one_block_longer_than_the_sequence_is_full_attention():
    sparse = make_layer("fixed", memory_size=64)
    full = AttentionConfig(memory_size=None, n_heads=2).build(D_MODEL).double()
    full.load_state_dict(sparse.state_dict())
    x = randn(2, 40, D_MODEL)
    torch.testing.assert_close(sparse(x)[0], full(x)[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("pattern", "bound"),
    # Slots after a whole number of blocks: strided 2l; fixed l summaries; longformer l-1+n_global.
    [("strided", 2 * 8), ("fixed", 8), ("longformer", 8 - 1 + 2)],
)
def test_state_is_flat_in_the_sequence_length(pattern, bound):
    layer = make_layer(pattern, memory_size=8)
    for steps in (256, 1024):
        with torch.no_grad():
            _, state = run_chunks(layer, randn(1, steps, D_MODEL), None, [64] * (steps // 64))
        assert state.keys.shape[1] == layer.slots(steps) == bound
        assert state.nbytes_per_sequence() == layer.state_size_bytes(steps, torch.float64)
    assert layer.state_size_bytes(256) == layer.state_size_bytes(1024)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_state_size_bytes_is_exact_at_threshold_zero(pattern):
    layer = make_layer(pattern)
    for steps, chunks in [(1, [1]), (6, [2, 4]), (33, [5, 1, 11, 16])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, steps, D_MODEL), None, chunks)
        assert state.nbytes_per_sequence() == layer.state_size_bytes(steps, torch.float64)
        assert state.window_start.tolist() == [layer._window_start(steps)] * 2
    assert layer.slots(33) <= 2 * BLOCK


@settings(max_examples=15, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    memory_size=st.integers(2, 9),
    threshold=st.sampled_from([0.0, 0.05, 0.3]),
    chunks=st.lists(st.integers(1, 25), min_size=1, max_size=5),
)
def test_entries_never_exceed_the_bound(pattern, memory_size, threshold, chunks):
    layer = make_layer(pattern, threshold, memory_size=memory_size, n_global=2)
    state, seen = None, 0
    for size in chunks:
        with torch.no_grad():
            _, state = layer(3.0 * randn(2, size, D_MODEL), state)
        seen += size
        assert (state.live_entries() <= memory_size).all()
        assert (state.window_entries() <= memory_size).all()
        assert state.keys.shape[1] <= layer.slots(seen) <= 2 * memory_size
        assert state.nbytes_per_sequence() <= layer.state_size_bytes(seen, torch.float64)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_threshold_drops_every_key_under_it_after_each_token(pattern):
    tracker = make_layer(pattern, 1e-12)  # tracks shares, drops nothing (every share is > 0)
    strict = with_config(tracker, forget_threshold=0.15)
    reachable = make_layer(pattern)
    reachable.load_state_dict(tracker.state_dict())
    x = randn(2, 27, D_MODEL)
    with torch.no_grad():
        _, everything = tracker(x)
        y_strict, state = strict(x)
        y_all, exact = reachable(x)
    # Tracking shares changes nothing by itself; the first token reads before any judgement.
    assert everything.positions.equal(exact.positions)
    torch.testing.assert_close(y_strict[:, :1], y_all[:, :1], atol=1e-12, rtol=0)
    for b in range(2):
        assert (state.share[b][state.valid[b]] >= 0.15).all()
    assert (state.live_entries() <= exact.live_entries()).all()
    assert not torch.equal(y_strict, y_all), "the threshold must really drop keys"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_higher_threshold_never_keeps_more(pattern):
    base = make_layer(pattern)
    warm = warm_state(base, 4, 13)
    x = randn(4, 19, D_MODEL)
    message = "the threshold must really drop keys"
    assert_higher_threshold_never_keeps_more(base, x, warm, held=held_keys, message=message)


def held_keys(state: SparseState) -> torch.Tensor:
    """`[B]`: every key held, the window's included (`live_entries` counts the long range)."""
    return state.valid.sum(1)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_padded_batch_equals_each_sequence_alone(pattern, threshold):
    layer = make_layer(pattern, threshold)
    states = warm_states(layer, (2, 17, 9))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 6, D_MODEL))


def test_an_empty_chunk_changes_nothing():
    layer = make_layer("fixed", 0.2)
    state = warm_state(layer, 2, 9)
    for forward in (layer, layer.reference_forward):
        y, after = forward(randn(2, 0, D_MODEL), state)
        assert y.shape == (2, 0, D_MODEL)
        assert_states_close(after, state, atol=0)


def test_float32_long_stream_is_finite_and_learns():
    torch.manual_seed(1)
    layer = SparseConfig(pattern="fixed", memory_size=8).build(32)
    with torch.no_grad():
        assert_finite(*run_chunks(layer, torch.randn(2, 512, 32), None, [64] * 8))
    x, target = torch.randn(4, 40, 32), torch.randn(4, 40, 32)
    losses = adam_losses(layer, x, target, steps=8)
    assert losses[-1] < losses[0]


def test_metrics():
    layer = make_layer("fixed")
    state = warm_state(layer, 2, 14)
    # 14 tokens, l = 4: summaries 3, 7, 11 held, and the partial block 12, 13.
    assert state.live_entries().tolist() == [3, 3]
    assert state.window_entries().tolist() == [2, 2]
    assert state.metrics() == {"live_entries": 3.0, "window_entries": 2.0, "evictions": 9.0}


def test_config_defaults_and_json():
    config = SparseConfig()
    assert (config.pattern, config.memory_size, config.summary_len) == ("fixed", 16, 1)
    assert SparseConfig.model_validate_json(config.model_dump_json()) == config
    assert SparseConfig(pattern="strided", memory_size=1).build(16).slots(5) == 2


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"summary_len": 4, "memory_size": 4}, "summary_len"),
        ({"summary_len": 0}, "summary_len"),
        ({"pattern": "longformer", "n_global": 5, "memory_size": 4}, "n_global"),
        ({"pattern": "longformer", "n_global": -1}, "n_global"),
        ({"pattern": "strided", "n_heads": 3}, "n_heads"),
        ({"pattern": "dilated"}, "pattern"),
        ({"memory_size": None}, "memory_size"),
        ({"stride": 4}, "stride"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(SparseConfig, fields, name)
