"""Retrieval memory: fast == per-token reference, the entry rule, FIFO and share eviction,
top-k retrieval of a planted entry, stop-gradient, and the faiss index against the exact one."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    adam_losses,
    assert_chunked_equals_full,
    assert_empty_slots_change_nothing,
    assert_fast_matches_reference,
    assert_higher_threshold_never_keeps_more,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_same_gradients,
    assert_states_close,
    randn,
    run_chunks,
    streamed_states,
    warm_state,
    warm_states,
    with_config,
)

from memory_models import retrieval
from memory_models.knn_index import ExactIndex, FaissIndex, make_index
from memory_models.retrieval import RetrievalConfig, RetrievalLayer, RetrievalState

D_MODEL = 16
MEMORY_SIZE = 8
WINDOW = 4
# forget_threshold 0 (FIFO) and one that evicts: shares decay by 0.8 per token.
THRESHOLDS = [0.0, 0.2]


def make_layer(
    memory_size: int = MEMORY_SIZE,
    threshold: float = 0.0,
    local_window: int = WINDOW,
    top_k: int = 3,
    **fields,
) -> RetrievalLayer:
    config = RetrievalConfig(
        memory_size=memory_size,
        forget_threshold=threshold,
        local_window=local_window,
        top_k=top_k,
        n_heads=2,
        share_decay=fields.pop("share_decay", 0.8),
        **fields,
    )
    return config.build(D_MODEL).double()


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_fast_matches_reference(threshold, warm, steps):
    layer = make_layer(threshold=threshold)
    state = None
    if warm:
        # A full store and window, so stored, window and chunk entries all matter.
        state = warm_state(layer, 2, 19)
        assert (state.live_entries() == MEMORY_SIZE).all()
    x = randn(2, steps, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=state, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_fast_matches_reference_streaming_in_uneven_chunks(threshold):
    layer = make_layer(threshold=threshold, local_window=3)
    x = randn(3, 45, D_MODEL).requires_grad_()
    chunks = [1, 1, 9, 3, 17, 1, 13]
    gradients = [x, *layer.parameters()]
    _, state = assert_fast_matches_reference(layer, x, chunks, gradients=gradients)
    if threshold > 0:
        assert (state.evictions > 0).all(), "the threshold must really evict here"


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_query_blocks_change_nothing(monkeypatch, threshold):
    """A long call is scored in blocks of queries: blocks of 5 must equal the reference."""
    monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 5)
    layer = make_layer(threshold=threshold)
    warm = warm_state(layer, 2, 13)
    x = randn(2, 33, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=warm, gradients=[x, *layer.parameters()])


def test_chunked_equals_full_pass_at_threshold_zero():
    layer = make_layer()
    assert_chunked_equals_full(layer, randn(2, 40, D_MODEL), [5, 1, 11, 16, 7])


def test_stored_entries_get_no_gradient():
    layer = make_layer()
    warm = warm_state(layer, 2, 20)
    stored = {name: getattr(warm, name).clone().requires_grad_() for name in ("keys", "values")}
    state = RetrievalState(**{**warm.tensors(), **stored})
    x = randn(2, 9, D_MODEL).requires_grad_()
    for forward in (layer, layer.reference_forward):
        y, new_state = forward(x, state)
        assert not any(t.requires_grad for t in new_state.tensors().values())
        key_grad, value_grad, x_grad = torch.autograd.grad(
            y.square().sum(), [stored["keys"], stored["values"], x], allow_unused=True
        )
        assert key_grad is None and value_grad is None
        assert x_grad is not None and x_grad.abs().max() > 0


def test_the_store_is_a_fifo_of_the_tokens_that_left_the_window():
    layer = make_layer(memory_size=5, local_window=3)
    x = randn(2, 30, D_MODEL)
    state, seen = None, 0
    for size in (1, 2, 6, 1, 9, 11):
        with torch.no_grad():
            _, state = layer(x[:, seen : seen + size], state)
        seen += size
        # Tokens up to seen - 3 have left the window; the store keeps the newest 5 of them.
        entered = list(range(seen - 2))
        assert state.positions.tolist() == [entered[-5:]] * 2
        assert state.window_positions.tolist() == [list(range(max(seen - 2, 0), seen))] * 2
        assert state.evictions.tolist() == [len(entered) - len(entered[-5:])] * 2


def test_a_query_sees_the_window_and_the_newest_entries_but_nothing_older():
    """memory_size 2, window 3: at t = 20 the window is 18..20, the store holds 16 and 17."""
    layer = make_layer(memory_size=2, local_window=3)
    x = randn(1, 24, D_MODEL)
    chunks = [7, 13, 4]
    y, _ = run_chunks(layer, x, None, chunks)
    for position, matters in [(15, False), (16, True), (17, True), (18, True), (3, False)]:
        changed = x.clone()
        changed[:, position] += 1.0
        y_changed, _ = run_chunks(layer, changed, None, chunks)
        difference = (y_changed[:, 20] - y[:, 20]).abs().max().item()
        assert (difference > 1e-6) == matters, (position, difference)


def planting_layer(top_k: int = 1, **fields) -> RetrievalLayer:
    """Width 8, 2 heads of 4: q = k = v = x per head, identity output, gate g = 1 - 2e-22."""
    config = RetrievalConfig(n_heads=2, top_k=top_k, **fields)
    layer = config.build(8).double()
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.eye(8).repeat(3, 1))
        layer.out.weight.copy_(torch.eye(8))
        layer.out.bias.zero_()
        layer.gate.fill_(50.0)
    return layer


def planted_state(keys: torch.Tensor, values: torch.Tensor, share=None) -> RetrievalState:
    """A store of `keys, values: [N, 2, 4]` at positions 0..N-1, an empty window, at 100."""
    count = keys.shape[0]
    empty = torch.zeros(1, 0, 2, 4, dtype=torch.float64)
    return RetrievalState(
        keys=torch.nn.functional.normalize(keys, dim=-1)[None],
        values=values[None],
        positions=torch.arange(count)[None],
        valid=torch.ones(1, count, dtype=torch.bool),
        share=torch.zeros(1, count, dtype=torch.float64) if share is None else share[None].double(),
        window_keys=empty,
        window_values=empty.clone(),
        window_positions=torch.zeros(1, 0, dtype=torch.long),
        window_valid=torch.zeros(1, 0, dtype=torch.bool),
        position=torch.tensor([100]),
        evictions=torch.tensor([0]),
    )


def basis(index: int) -> torch.Tensor:
    return torch.eye(4, dtype=torch.float64)[index]


@pytest.mark.parametrize("reference", [False, True])
def test_top_k_retrieves_the_planted_entry(reference):
    layer = planting_layer(memory_size=16)
    keys = torch.stack([torch.stack([basis(i), basis(3 - i)]) for i in range(4)])  # [4, 2, 4]
    values = randn(4, 2, 4)
    state = planted_state(keys, values)
    # Head 0 asks for key e_2 (entry 2), head 1 for e_0 (entry 3): each gets that value back.
    x = torch.cat([basis(2), basis(0)])[None, None] + 0.1 * torch.cat([basis(1), basis(1)])
    forward = layer.reference_forward if reference else layer
    y, _ = forward(x, state)
    expected = torch.cat([values[2, 0], values[3, 1]])
    torch.testing.assert_close(y[0, 0], expected, atol=1e-12, rtol=0)


def test_top_k_softmaxes_over_the_retrieved_only():
    layer = planting_layer(top_k=2, memory_size=16)
    keys = torch.stack([torch.stack([basis(i), basis(i)]) for i in range(4)])
    values = randn(4, 2, 4)
    x = (torch.cat([basis(0), basis(0)]) + 0.5 * torch.cat([basis(1), basis(1)]))[None, None]
    y, _ = layer(x, planted_state(keys, values))
    q = torch.nn.functional.normalize(basis(0) + 0.5 * basis(1), dim=0)
    temperature = layer.log_temperature.exp()[0]
    weights = (temperature * torch.stack([q[0], q[1]])).softmax(0)  # entries 0 and 1 only
    torch.testing.assert_close(
        y[0, 0, :4], weights[0] * values[0, 0] + weights[1] * values[1, 0], atol=1e-12, rtol=0
    )


def test_an_empty_memory_reads_zeros():
    layer = planting_layer(local_window=5)
    x = randn(2, 7, 8).requires_grad_()
    y, state = layer(x)
    # g = 1 - 2e-22: the output is the memory read alone, zero until position 5 enters.
    assert y[:, :5].abs().max() < 1e-15 and y[:, 5:].abs().max() > 1e-3
    assert state.live_entries().tolist() == [3, 3]  # positions 0..2 have left the window
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_shares_decay_and_rise_with_retrieval_exactly():
    """Entry 0 is retrieved by every query with probability 1; entry 1 never: it decays."""
    layer = planting_layer(memory_size=4, local_window=64, forget_threshold=1e-9, share_decay=0.9)
    keys = torch.stack([torch.stack([basis(0), basis(0)]), torch.stack([basis(1), basis(1)])])
    state = planted_state(keys, randn(2, 2, 4), share=torch.tensor([0.5, 0.5]))
    x = torch.cat([basis(0), basis(0)]).expand(1, 5, 8)
    for forward in (layer, layer.reference_forward):
        _, after = forward(x, state)
        torch.testing.assert_close(
            after.share,
            torch.tensor([[1.0, 0.5 * 0.9**5]], dtype=torch.float64),
            atol=1e-12,
            rtol=0,
        )
        evicting = with_config(layer, forget_threshold=0.5 * 0.9**5 + 1e-6)
        _, evicted = evicting(x, state)
        assert evicted.positions.tolist() == [[0]] and evicted.evictions.tolist() == [1]


@pytest.mark.parametrize(("threshold", "kept"), [(0.0, [1, 2, 100]), (0.1, [0, 2, 100])])
def test_over_capacity_the_lowest_share_goes_first(threshold, kept):
    """A full store of 3; one token enters at the end of the call. FIFO drops the oldest entry,
    a threshold drops the least retrieved (entry 1, share 0.2)."""
    layer = planting_layer(memory_size=3, local_window=1, forget_threshold=threshold)
    keys = torch.stack([torch.stack([basis(i), basis(i)]) for i in range(3)])
    shares = torch.tensor([0.9, 0.2, 0.6], dtype=torch.float64)
    state = planted_state(keys, randn(3, 2, 4), share=shares)
    x = torch.cat([basis(0), basis(0)])[None, None]  # retrieves entry 0
    for forward in (layer, layer.reference_forward):
        _, after = forward(x, state)
        assert after.positions.tolist() == [kept]
        assert after.evictions.tolist() == [1]


def test_a_threshold_nobody_falls_under_changes_nothing_below_capacity():
    layer = make_layer(memory_size=64)
    tracking = with_config(layer, forget_threshold=1e-12)
    x = randn(2, 40, D_MODEL)
    with torch.no_grad():
        y, state = run_chunks(layer, x, None, [9, 31])
        y_tracking, tracked = run_chunks(tracking, x, None, [9, 31])
    torch.testing.assert_close(y_tracking, y, atol=1e-12, rtol=0)
    assert tracked.positions.equal(state.positions) and tracked.evictions.equal(state.evictions)
    assert (state.share == 0).all() and (tracked.share > 0).all()


def test_higher_threshold_never_keeps_more():
    base = make_layer(memory_size=16)
    warm = warm_state(base, 4, 13)
    assert_higher_threshold_never_keeps_more(base, randn(4, 19, D_MODEL), warm)


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(1, 10),
    local_window=st.integers(1, 6),
    threshold=st.sampled_from([0.0, 0.05, 0.3, 0.7]),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=5),
)
def test_the_store_never_exceeds_memory_size(memory_size, local_window, threshold, chunks):
    layer = make_layer(memory_size, threshold, local_window)
    for state in streamed_states(layer, chunks, batch=3):
        assert (state.live_entries() <= memory_size).all()
        assert (state.window_valid.sum(1) <= local_window - 1).all()


def test_state_size_bytes_is_exact_at_threshold_zero_and_flat_in_length():
    layer = make_layer()
    for seq_len, chunks in [(1, [1]), (4, [4]), (8, [3, 5]), (33, [5, 1, 11, 16])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, seq_len, D_MODEL), None, chunks)
        assert state.nbytes_per_sequence() == layer.state_size_bytes(seq_len, torch.float64)
    long_run = layer.state_size_bytes(10**6)
    assert long_run == layer.state_size_bytes(MEMORY_SIZE + WINDOW)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold=threshold)
    states = warm_states(layer, (2, 17, 9))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 6, D_MODEL))


def test_extra_zero_slots_change_nothing():
    layer = make_layer(threshold=0.2)
    state = warm_state(layer, 2, 14)
    assert_empty_slots_change_nothing(layer, state, randn(2, 6, D_MODEL))


def test_indexes_agree_on_small_stores():
    pytest.importorskip("faiss")
    # HNSW with a candidate list longer than the store, IVF probing all its lists: both exact.
    faiss_methods = [FaissIndex("flat"), FaissIndex("hnsw"), FaissIndex("ivf")]
    keys = torch.nn.functional.normalize(randn(6, 50, 8), dim=-1)
    valid = torch.rand(6, 50) > 0.3
    valid[0] = False  # a group with nothing to find
    valid[1, :3], valid[1, 3:] = True, False  # fewer live keys than k
    queries = randn(6, 10, 8)
    scores, ids = ExactIndex().search(keys, valid, queries, 5)
    assert (ids[0] == -1).all() and (ids[1, :, 3:] == -1).all() and (ids[1, :, :3] >= 0).all()
    for index in faiss_methods:
        faiss_scores, faiss_ids = index.search(keys, valid, queries, 5)
        assert faiss_ids.equal(ids), index.method
        torch.testing.assert_close(faiss_scores, scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_the_faiss_layer_equals_the_exact_layer(threshold):
    pytest.importorskip("faiss")
    exact = make_layer(threshold=threshold)
    approximate = with_config(exact, index="faiss")
    x = randn(2, 40, D_MODEL).requires_grad_()
    y_exact, s_exact = run_chunks(exact, x, None, [3, 20, 17])
    y_faiss, s_faiss = run_chunks(approximate, x, None, [3, 20, 17])
    torch.testing.assert_close(y_faiss, y_exact, atol=1e-9, rtol=0)
    assert_states_close(s_faiss, s_exact)
    inputs_faiss, inputs_exact = [x, *approximate.parameters()], [x, *exact.parameters()]
    assert_same_gradients(y_faiss, y_exact, inputs_faiss, inputs_b=inputs_exact)


def test_a_faiss_layer_pickles():
    """Models are logged pickled: the layer must not hold the faiss module or an index."""
    pytest.importorskip("faiss")
    layer = make_layer(index="faiss")
    again = pickle.loads(pickle.dumps(layer))
    x = randn(1, 12, D_MODEL)
    torch.testing.assert_close(again(x)[0], layer(x)[0], atol=0, rtol=0)


def test_asking_for_faiss_without_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="faiss-cpu"):
        make_index("faiss")
    assert isinstance(make_index("exact"), ExactIndex)


def test_float32_has_a_pulse():
    layer = RetrievalConfig(memory_size=32, local_window=8, forget_threshold=0.05).build(32)
    with torch.no_grad():
        y, state = run_chunks(layer, torch.randn(2, 512, 32), None, [64] * 8)
    assert torch.isfinite(y).all() and state.keys.dtype == torch.float32
    assert set(state.metrics()) == {"live_entries", "evictions", "evictions_per_token"}
    x = torch.randn(4, 48, 32)
    target = torch.roll(x, 12, dims=1)  # recall from 12 tokens back: beyond the window
    losses = adam_losses(layer, x, target, steps=10)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": None}, "memory_size"),
        ({"top_k": 0}, "top_k"),
        ({"local_window": 0}, "local_window"),
        ({"share_decay": 1.5}, "share_decay"),
        ({"index": "annoy"}, "index"),
        ({"forget_threshold": 0.1, "share_decay": 1.0}, "share_decay"),
        ({"window": 4}, "window"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(RetrievalConfig, fields, name)
