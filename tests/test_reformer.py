"""Reformer LSH attention: fast == per-query reference, the hash, the sorted-chunk and self rules,
the bounded cache and eviction by attention share."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    adam_losses,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_finite,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_states_close,
    randn,
    run_chunks,
    streamed_states,
    warm_state,
    warm_states,
    with_config,
)
from torch.nn import functional as F

from memory_models.common import rotary
from memory_models.reformer import ReformerConfig, ReformerLayer, ReformerState, lsh_buckets

D_MODEL = 16
MEMORY_SIZE = 8
# (chunk_len, n_hashes, n_buckets): short chunks so that the chunk rule cuts often, one round,
# and few buckets (many same-bucket pairs, so chunk boundaries matter).
SHAPES = [(4, 2, 4), (3, 1, 8), (5, 3, 2)]


def make_layer(
    memory_size: int = MEMORY_SIZE,
    threshold: float = 0.0,
    chunk_len: int = 4,
    n_hashes: int = 2,
    n_buckets: int = 4,
    **fields,
) -> ReformerLayer:
    config = ReformerConfig(
        memory_size=memory_size,
        forget_threshold=threshold,
        n_heads=2,
        chunk_len=chunk_len,
        n_hashes=n_hashes,
        n_buckets=n_buckets,
        **fields,
    )
    return config.build(D_MODEL).double()


def one_bucket(layer: ReformerLayer) -> ReformerLayer:
    """Zero rotations: every projection ties at 0 and argmax picks bucket 0 for every token."""
    with torch.no_grad():
        layer.rotations.zero_()
    return layer


def assert_matches_reference_from(layer: ReformerLayer, state, x: torch.Tensor) -> None:
    """Fast path == reference from `state` on `x`: outputs, states, gradients of x and weights."""
    assert_fast_matches_reference(layer, x, state=state, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize(("chunk_len", "n_hashes", "n_buckets"), SHAPES)
def test_fast_matches_reference(chunk_len, n_hashes, n_buckets, threshold, steps):
    torch.manual_seed(steps)
    layer = make_layer(MEMORY_SIZE, threshold, chunk_len, n_hashes, n_buckets)
    warm = warm_state(layer, 2, 11)
    for state in (None, warm):
        assert_matches_reference_from(layer, state, randn(2, steps, D_MODEL).requires_grad_())


def test_fast_matches_reference_when_everything_is_one_bucket():
    """The chunk rule alone decides: a query sees the earlier tokens of its chunk and the last."""
    layer = one_bucket(make_layer(memory_size=6, chunk_len=3))
    _, warm = layer(randn(2, 5, D_MODEL))
    assert_matches_reference_from(layer, warm.detach(), randn(2, 17, D_MODEL).requires_grad_())


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_fast_matches_reference_streaming_in_uneven_chunks(threshold):
    layer = make_layer(threshold=threshold)
    x = randn(3, 40, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, [1, 1, 9, 3, 17, 1, 8], gradients=[x])


def test_chunked_equals_full_pass_at_threshold_zero():
    layer = make_layer()
    x = randn(2, 45, D_MODEL).requires_grad_()
    for chunks in ([5, 1, 11, 16, 12], [1] * 45):
        assert_chunked_equals_full(layer, x, chunks, gradients=[x])


def test_later_tokens_never_move_an_earlier_querys_chunks():
    """Sorting the whole sequence would: a later token hashed into a lower bucket shifts every
    rank above it. Each query sorts only its own prefix, so its output ignores the future."""
    layer = make_layer(memory_size=64, chunk_len=2, n_buckets=2)
    x = randn(1, 40, D_MODEL)
    y, _ = layer(x)
    for t in (5, 19, 30):
        for _ in range(3):
            changed = x.clone()
            changed[:, t + 1 :] = randn(1, 39 - t, D_MODEL)
            torch.testing.assert_close(
                layer(changed)[0][:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0
            )


def test_a_positive_multiple_hashes_to_the_same_buckets():
    rotations = torch.randn(3, 8, 4, dtype=torch.float64)
    x = randn(50, 8)
    buckets = lsh_buckets(x, rotations)
    assert buckets.shape == (50, 3) and buckets.min() >= 0 and buckets.max() < 8
    for scale in (1e-3, 0.5, 7.0, 1e4):
        assert torch.equal(lsh_buckets(scale * x, rotations), buckets)
    # -x projects to -xR: the argmax moves to the other half of [xR ; -xR].
    assert torch.equal(lsh_buckets(-x, rotations), (buckets + 4) % 8)
    assert len(buckets.unique()) > 4, "random rotations should spread vectors over buckets"


def oracle_lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> list[int]:
    """`x: [Dh]` -> bucket per round, written out: the largest of the 2 * n/2 signed projections."""
    out = []
    for rotation in rotations:
        projected = (x @ rotation).tolist()
        signed = projected + [-p for p in projected]
        out.append(signed.index(max(signed)))
    return out


def test_layer_hashes_the_shared_qk_vector():
    layer = make_layer(memory_size=16, n_hashes=3, n_buckets=6)
    x = randn(1, 9, D_MODEL)
    _, state = layer(x)
    qk = layer.shared_qk(x).view(1, 9, 2, layer.head_dim)
    for t, h in itertools.product(range(9), range(2)):
        assert state.buckets[0, t, h].tolist() == oracle_lsh_buckets(qk[0, t, h], layer.rotations)


def test_rotations_are_saved_with_the_weights_and_reloaded():
    layer = make_layer(hash_seed=3)
    assert "rotations" in layer.state_dict()
    assert torch.equal(make_layer(hash_seed=3).rotations, layer.rotations), "seeded: reproducible"
    other_seed = with_config(layer, hash_seed=4)  # loads layer's state dict
    fresh = make_layer(hash_seed=4)
    assert torch.equal(other_seed.rotations, layer.rotations)
    assert not torch.equal(fresh.rotations, layer.rotations)
    x = randn(2, 21, D_MODEL)
    y, state = layer(x)
    y_again, state_again = other_seed(x)
    torch.testing.assert_close(y_again, y, atol=0, rtol=0)
    assert_states_close(state_again, state, atol=0)


def one_bucket_oracle(layer: ReformerLayer, x: torch.Tensor) -> torch.Tensor:
    """Outputs from the empty state when every token is in bucket 0, written out independently.

    Sorted order is then position order, so query t (rank t) sees the tokens s < t with
    s >= m * (t // m - 1); token 0 sees only itself.
    """
    steps, m = x.shape[1], layer.config.chunk_len
    heads, dim = layer.n_heads, layer.head_dim
    positions = torch.arange(steps).expand(1, steps)
    qk = layer.shared_qk(x).view(1, steps, heads, dim)
    q = rotary(qk, positions)
    k = rotary(F.normalize(qk, dim=-1), positions)
    v = layer.value(x).view(1, steps, heads, dim)
    reads = []
    for t in range(steps):
        seen = [s for s in range(steps) if s < t and s >= m * (t // m - 1)] or [t]
        scores = torch.einsum("hd,nhd->hn", q[0, t], k[0, seen]) / math.sqrt(dim)
        reads.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v[0, seen]))
    # Both rounds see the same items, so they get equal weights and the same read.
    return layer.out(torch.stack(reads).flatten(1))[None]


def test_one_bucket_is_attention_over_the_chunk_and_the_chunk_before():
    layer = one_bucket(make_layer(memory_size=64, chunk_len=4))
    x = randn(1, 19, D_MODEL)
    y, _ = layer(x)
    torch.testing.assert_close(y, one_bucket_oracle(layer, x), atol=1e-12, rtol=0)
    # Query 9 sits in chunk 2: it sees positions 4..8, not 3 (chunk 0) and not itself.
    for changed, matters in [(3, False), (4, True), (8, True)]:
        other = x.clone()
        other[:, changed] += 1.0
        moved = (layer(other)[0][:, 9] - y[:, 9]).abs().max()
        assert (moved > 1e-6) == matters, (changed, moved)


def test_a_token_attends_to_itself_only_when_alone():
    layer = one_bucket(make_layer(memory_size=64, chunk_len=4))
    x = randn(1, 6, D_MODEL)
    y, _ = layer(x)
    alone = layer.out(layer.value(x[:, 0]))  # token 0 has nothing before it: it reads itself
    torch.testing.assert_close(y[:, 0], alone, atol=1e-12, rtol=0)
    # Every later token has someone before it, so the oracle never lists t among t's keys.
    torch.testing.assert_close(y, one_bucket_oracle(layer, x), atol=1e-12, rtol=0)


def test_a_query_never_reads_a_key_from_another_bucket():
    """One round, chunks longer than the sequence: the bucket alone decides who sees whom.
    Scaling token j by c > 0 keeps its buckets and unit key and scales its value: it moves the
    outputs of exactly the later tokens in its bucket."""
    layer = make_layer(memory_size=64, chunk_len=64, n_hashes=1, n_buckets=4)
    x = randn(1, 24, D_MODEL)
    y, state = layer(x)
    buckets = state.buckets[0, :, :, 0]  # [T, H]
    for j in (2, 7, 15):
        scaled = x.clone()
        scaled[:, j] *= 3.0
        y_scaled, _ = layer(scaled)
        for i in range(j + 1, 24):
            shares_a_bucket = bool((buckets[i] == buckets[j]).any())
            moved = (y_scaled[0, i] - y[0, i]).abs().max().item()
            assert (moved > 1e-9) == shares_a_bucket, (i, j, moved)


def test_causal_from_a_warm_state():
    layer = make_layer()
    with torch.no_grad():
        _, warm = layer(randn(2, 13, D_MODEL))
        x = randn(2, 20, D_MODEL)
        y, _ = layer(x, warm)
        for t in (0, 6, 18):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            torch.testing.assert_close(layer(changed, warm)[0][:, : t + 1], y[:, : t + 1])


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 0.7]),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=5),
)
def test_live_entries_never_exceed_memory_size(memory_size, threshold, chunks):
    layer = make_layer(memory_size, threshold)
    for state in streamed_states(layer, chunks, batch=3):
        assert (state.live_entries() <= memory_size).all()
        assert state.valid.sum(1).equal(state.live_entries())


def test_state_bytes_are_exact_and_flat_beyond_memory_size():
    layer = make_layer()
    sizes = []
    for seq_len, chunks in [(1, [1]), (8, [3, 5]), (33, [5, 1, 11, 16]), (64, [64])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, seq_len, D_MODEL), None, chunks)
        assert state.nbytes_per_sequence() == layer.state_size_bytes(seq_len, torch.float64)
        assert state.positions[0].tolist() == list(range(max(0, seq_len - MEMORY_SIZE), seq_len))
        sizes.append(state.nbytes_per_sequence())
    assert sizes[1] == sizes[2] == sizes[3]


def test_the_threshold_acts_after_each_token():
    """A token reads the cache as it stands, then the threshold judges: the first token of a call
    sees what it would see without one, the later ones see the narrowed cache."""
    base = make_layer()
    with torch.no_grad():
        _, warm = base(randn(2, 9, D_MODEL))
        x = randn(2, 14, D_MODEL)
        y, state = base(x, warm)
        y_strict, strict = with_config(base, forget_threshold=0.3)(x, warm)
    torch.testing.assert_close(y_strict[:, :1], y[:, :1], atol=1e-12, rtol=0)
    assert not torch.equal(y_strict, y)
    assert (state.share == 0).all(), "threshold 0 tracks no share"
    assert (strict.live_entries() <= state.live_entries()).all()


def tracked_shares(x: torch.Tensor) -> tuple[ReformerLayer, list[dict[int, float]]]:
    """A layer that tracks shares and has room for everything, and each row's {position: share}.

    Its threshold is tiny but not 0, so it evicts exactly the tokens no query gave any weight
    (LSH attention leaves some: a token whose bucket later tokens never share, for one).
    """
    tracker = make_layer(memory_size=64, threshold=1e-300)
    with torch.no_grad():
        _, state = tracker(x)
    shares = [
        dict(
            zip(
                state.positions[b][state.valid[b]].tolist(),
                state.share[b][state.valid[b]].tolist(),
                strict=True,
            )
        )
        for b in range(x.shape[0])
    ]
    return tracker, shares


def test_threshold_keeps_exactly_the_entries_above_it_when_capacity_allows():
    x = randn(2, 25, D_MODEL)
    tracker, shares = tracked_shares(x)
    with torch.no_grad():
        _, state = with_config(tracker, forget_threshold=0.15)(x)
    for b, share in enumerate(shares):
        above = [p for p in range(25) if share.get(p, 0.0) >= 0.15]
        assert state.positions[b][state.valid[b]].tolist() == above
    assert (state.evictions == 25 - state.live_entries()).all()


def test_over_capacity_the_most_attended_entries_are_kept(monkeypatch):
    """memory_size is also each query's reach, so the shares are read where eviction reads them:
    the candidates `[cache ; token]` and their shares after the token (eviction is per token)."""
    layer = make_layer(memory_size=5, threshold=0.02)
    seen = {}

    def spy(valid, share):
        seen.update(valid=valid, share=share)
        return type(layer)._keep(layer, valid, share)

    monkeypatch.setattr(layer, "_keep", spy)
    with torch.no_grad():
        # Sessions of different lengths stacked: the shorter caches are padded with dead slots.
        warm = ReformerState.stack([layer(2.0 * randn(1, n, D_MODEL))[1] for n in (2, 9, 4)])
        assert not warm.valid.all()
        _, state = layer(2.0 * randn(3, 1, D_MODEL), warm)
    # The layer lists its candidates with dead cache slots first, live ones in age order after.
    chunk = warm.position[:, None] + torch.arange(1)
    positions = torch.cat([warm.positions, chunk], dim=1)
    valid = torch.cat([warm.valid, torch.ones(3, 1, dtype=torch.bool)], dim=1)
    order = valid.long().argsort(dim=1, stable=True)
    assert torch.equal(seen["valid"], valid.gather(1, order))
    for b in range(3):
        live = seen["valid"][b]
        candidates = positions[b][order[b]][live].tolist()
        share = dict(zip(candidates, seen["share"][b][live].tolist(), strict=True))
        kept = state.positions[b][state.valid[b]].tolist()
        dropped = [p for p in share if p not in kept and share[p] >= 0.02]
        assert all(share[p] >= 0.02 for p in kept) and len(kept) <= 5
        if dropped:
            assert len(kept) == 5
            assert min(share[p] for p in kept) >= max(share[p] for p in dropped)


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold=threshold)
    states = warm_states(layer, (2, 17, 5))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 7, D_MODEL))


def test_float32_long_stream_is_finite_and_learns():
    torch.manual_seed(0)
    layer = ReformerConfig(memory_size=32, chunk_len=16).build(32)
    with torch.no_grad():
        assert_finite(*run_chunks(layer, torch.randn(2, 512, 32), None, [64] * 8))
    x, target = torch.randn(4, 48, 32), torch.randn(4, 48, 32)
    losses = adam_losses(layer, x, target, steps=15)
    assert losses[-1] < 0.9 * losses[0]


def test_config_defaults_and_json():
    config = ReformerConfig()
    assert (config.memory_size, config.n_hashes, config.n_buckets, config.chunk_len) == (
        64,
        2,
        8,
        16,
    )
    assert ReformerConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": None}, "memory_size"),
        ({"n_buckets": 5}, "n_buckets"),
        ({"n_buckets": 0}, "n_buckets"),
        ({"n_hashes": 0}, "n_hashes"),
        ({"chunk_len": 0}, "chunk_len"),
        ({"hash_seed": -1}, "hash_seed"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"buckets": 4}, "buckets"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(ReformerConfig, fields, name)
