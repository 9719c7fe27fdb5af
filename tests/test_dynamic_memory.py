"""Dynamic memory: fast == per-slot reference, capacity grows and shrinks, forgetting, read-back."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    UNEVEN_CHUNKS,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_same_gradients,
    assert_states_close,
    orthonormal,
    randn,
    states_at_thresholds,
    warm_state,
    warm_states,
    with_config,
)

from memory_models.dynamic_memory import (
    STEP_STATS,
    DynamicMemoryConfig,
    DynamicMemoryLayer,
    DynamicMemoryState,
)

D_MODEL = 16
MEMORY_SIZE = 8


def make_layer(threshold: float = 0.0, **fields) -> DynamicMemoryLayer:
    config = DynamicMemoryConfig(memory_size=MEMORY_SIZE, forget_threshold=threshold, **fields)
    return config.build(D_MODEL).double()


def identity_layer(threshold: float = 0.0, strength: float = 50.0) -> DynamicMemoryLayer:
    """Query and candidate are `x` itself, the gate is ~1, sharp reads, and `y` is the read."""
    layer = make_layer(threshold)
    eye = torch.eye(D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        layer.query.weight.copy_(eye)
        layer.candidate.weight.copy_(eye)
        layer.candidate.bias.zero_()
        layer.strength.weight.zero_()
        layer.strength.bias.fill_(strength)
        layer.gate.weight.zero_()
        layer.gate.bias.fill_(40.0)
        layer.out.weight.copy_(torch.cat([torch.zeros_like(eye), eye], dim=1))
        layer.out.bias.zero_()
    return layer


def hand_set_state(layer: DynamicMemoryLayer, contents: torch.Tensor) -> DynamicMemoryState:
    """One sequence whose first `len(contents)` slots hold `contents`, importance 1."""
    state = layer.init_state(1, dtype=torch.float64)
    count = contents.shape[0]
    state.slots[0, :count] = contents
    state.importance[0, :count] = 1.0
    state.live[0, :count] = True
    return state


@pytest.mark.parametrize(
    ("threshold", "n_heads", "match_threshold"),
    [(0.0, 1, 0.8), (0.4, 2, 0.8), (0.6, 1, 0.3)],
)
@pytest.mark.parametrize("length", [1, 33, 63])
def test_fast_matches_reference_outputs_state_stats_and_gradients(
    length, threshold, n_heads, match_threshold
):
    layer = make_layer(threshold, n_heads=n_heads, match_threshold=match_threshold)
    state = warm_state(layer, 2, 11)
    x = randn(2, length, D_MODEL).requires_grad_()
    y_fast, s_fast = layer(x, state)
    stats_fast = layer.last_step_stats
    y_ref, s_ref = layer.reference_forward(x, state)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-9, rtol=0)
    assert_states_close(s_fast, s_ref)
    for name in STEP_STATS:
        assert torch.equal(stats_fast[name], layer.last_step_stats[name]), name
    assert_same_gradients(y_fast, y_ref, [x, *layer.parameters()])


def test_reference_exercises_merges_allocations_and_both_evictions():
    """The parametrisation above is only meaningful if every decision actually happens."""
    layer = make_layer(0.6, match_threshold=0.3)
    layer.reference_forward(randn(2, 63, D_MODEL), warm_state(layer, 2, 11))
    stats = layer.last_step_stats
    assert stats["merges"].sum() > 0 and stats["allocations"].sum() > 0
    assert stats["evictions"].sum() > 0
    full = make_layer(0.0, match_threshold=0.99)
    full.reference_forward(randn(2, 20, D_MODEL))
    assert full.last_step_stats["evictions"].sum() > 0  # displaced at full capacity


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_chunked_with_carried_state_equals_full_pass(threshold):
    layer = make_layer(threshold, match_threshold=0.4)
    x = randn(3, sum(UNEVEN_CHUNKS), D_MODEL)
    y_full, s_full = layer(x)
    stats_full = layer.last_step_stats
    outputs, stats, state, start = [], [], None, 0
    for size in UNEVEN_CHUNKS:
        y, state = layer(x[:, start : start + size], state)
        outputs.append(y)
        stats.append(layer.last_step_stats)
        start += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), y_full, atol=1e-9, rtol=0)
    assert_states_close(state, s_full)
    for name in STEP_STATS:
        assert torch.equal(torch.cat([s[name] for s in stats], dim=1), stats_full[name]), name


def test_step_stats_have_one_entry_per_token_and_add_up_to_the_state():
    layer = make_layer(0.5, match_threshold=0.4)
    start = warm_state(layer, 3, 9)
    _, state = layer(randn(3, 21, D_MODEL), start)
    stats = layer.last_step_stats
    assert set(stats) == set(STEP_STATS)
    for name in STEP_STATS:
        assert stats[name].shape == (3, 21) and stats[name].dtype == torch.long, name
    assert torch.equal(stats["live_slots"][:, -1], state.live_entries())
    for counter in ("evictions", "merges", "allocations"):
        gained = getattr(state, counter) - getattr(start, counter)
        assert torch.equal(stats[counter].sum(1), gained), counter
    # Every token either merges or allocates; live slots change by allocations - evictions.
    assert (stats["merges"] + stats["allocations"] == 1).all()
    previous = torch.cat([start.live_entries()[:, None], stats["live_slots"][:, :-1]], dim=1)
    assert torch.equal(stats["live_slots"] - previous, stats["allocations"] - stats["evictions"])


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(1, 6),
    threshold=st.floats(0.0, 0.95),
    match_threshold=st.floats(-1.0, 1.0),
    decay=st.floats(0.0, 0.99),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_live_slots_never_exceed_memory_size_and_invariants_hold(
    memory_size, threshold, match_threshold, decay, scale, seed
):
    torch.manual_seed(seed)
    config = DynamicMemoryConfig(
        memory_size=memory_size,
        forget_threshold=threshold,
        match_threshold=match_threshold,
        importance_decay=decay,
    )
    layer = config.build(D_MODEL)
    state = None
    for chunk in (1, 7, 3, 12):
        with torch.no_grad():
            _, state = layer(torch.randn(3, chunk, D_MODEL) * scale, state)
        assert state.slots.shape[1] == memory_size
        assert (state.live_entries() <= memory_size).all()
        assert (layer.last_step_stats["live_slots"] <= memory_size).all()
        # Live slots have passed the forget test; free slots are empty.
        assert (state.importance[state.live] >= threshold).all()
        assert (state.slots[~state.live] == 0).all() and (state.importance[~state.live] == 0).all()
    assert torch.equal(state.live_entries(), state.allocations - state.evictions)
    assert torch.equal(state.merges + state.allocations, torch.full_like(state.merges, 23))


@settings(max_examples=15, deadline=None)
@given(
    low=st.floats(0.0, 0.95),
    raise_by=st.floats(0.0, 0.5),
    warm_tokens=st.integers(1, 40),
    decay=st.floats(0.3, 0.95),
    seed=st.integers(0, 2**16),
)
def test_raising_forget_threshold_never_increases_live_slots(
    low, raise_by, warm_tokens, decay, seed
):
    """One token from the same state: the higher threshold frees a superset of slots.

    With several tokens the two memories diverge (a slot the higher threshold freed is re-taken,
    fewer slots share the reads), so the guarantee is per token; the aggregate test below checks
    the trend over long streams.
    """
    torch.manual_seed(seed)
    high = min(low + raise_by, 0.99)
    base = make_layer(0.0, importance_decay=decay, match_threshold=0.5)
    state = warm_state(base, 4, warm_tokens)
    s_low, s_high = states_at_thresholds(base, randn(4, 1, D_MODEL), state, [low, high])
    assert (s_high.live_entries() <= s_low.live_entries()).all()
    assert not (s_high.live & ~s_low.live).any()


def test_higher_forget_threshold_holds_fewer_slots_over_a_long_stream():
    """A stream of recurring noisy patterns (some frequent, some rare), as in real text."""
    base = make_layer(0.0)
    patterns = randn(12, D_MODEL)
    frequency = 1.0 / torch.arange(1, 13, dtype=torch.float64)  # Zipf-like
    index = torch.multinomial(frequency, 16 * 200, replacement=True).view(16, 200)
    x = patterns[index] + 0.05 * randn(16, 200, D_MODEL)
    means = []
    with torch.no_grad():
        for threshold in (0.0, 0.4, 0.8, 0.95):
            layer = with_config(base, forget_threshold=threshold)
            layer(x)
            means.append(layer.last_step_stats["live_slots"].double().mean().item())
    assert all(later <= earlier for earlier, later in itertools.pairwise(means))
    assert means[-1] < means[0] - 0.5


def test_forget_threshold_frees_unread_slots_and_keeps_the_read_one():
    patterns = orthonormal(4, D_MODEL)
    for threshold, survivors in ((0.0, 4), (0.5, 1)):
        layer = identity_layer(threshold)
        state = hand_set_state(layer, patterns)
        # Every token reads (and merges into) slot 0; the others decay by 0.9 per token.
        x = patterns[0].expand(1, 10, D_MODEL)
        with torch.no_grad():
            _, state = layer(x, state)
        stats = layer.last_step_stats
        assert state.live[0].nonzero().flatten().tolist() == list(range(survivors))
        if threshold > 0:
            # 0.9^6 = 0.53 >= 0.5 > 0.9^7 = 0.48: freed at the 7th token, all three at once.
            unread_for = math.ceil(math.log(threshold) / math.log(0.9))
            assert stats["live_slots"][0].tolist() == [4] * (unread_for - 1) + [1] * (
                11 - unread_for
            )
            assert stats["evictions"][0, unread_for - 1] == 3 and state.evictions.item() == 3
        assert state.merges.item() == 10


def test_capacity_grows_on_novel_content_and_not_on_repeated_content():
    layer = identity_layer()
    novel = orthonormal(MEMORY_SIZE + 3, D_MODEL)[None]  # [1, M+3, D]: pairwise cosine 0
    with torch.no_grad():
        _, state = layer(novel)
    stats = layer.last_step_stats
    assert stats["live_slots"][0].tolist() == [*range(1, MEMORY_SIZE + 1), *[MEMORY_SIZE] * 3]
    assert stats["evictions"][0].tolist() == [0] * MEMORY_SIZE + [1] * 3  # displaced when full
    assert state.allocations.item() == MEMORY_SIZE + 3 and state.merges.item() == 0

    repeated = novel[:, :1].expand(1, 12, D_MODEL)
    with torch.no_grad():
        _, state = layer(repeated)
    assert layer.last_step_stats["live_slots"][0].tolist() == [1] * 12
    assert state.merges.item() == 11 and state.allocations.item() == 1


def test_full_memory_displaces_the_least_important_slot():
    layer = identity_layer()
    patterns = orthonormal(MEMORY_SIZE + 1, D_MODEL)
    state = hand_set_state(layer, patterns[:MEMORY_SIZE])
    state.importance[0] = torch.linspace(2.0, 3.0, MEMORY_SIZE, dtype=torch.float64)
    state.importance[0, 5] = 0.5
    with torch.no_grad():
        _, state = layer(patterns[MEMORY_SIZE][None, None], state)
    torch.testing.assert_close(state.slots[0, 5], patterns[MEMORY_SIZE], atol=1e-12, rtol=0)
    assert state.importance[0, 5].item() == 1.0
    assert state.live.all() and state.evictions.item() == 1


def test_a_hand_set_slot_is_read_back_with_its_key():
    layer = identity_layer()
    directions = orthonormal(5, D_MODEL)
    contents = directions * torch.tensor([3.0, 0.5, 1.0, 7.0, 2.0], dtype=torch.float64)[:, None]
    state = hand_set_state(layer, contents)
    for j in range(5):
        with torch.no_grad():
            y, _ = layer(directions[j][None, None], state)
        torch.testing.assert_close(y[0, 0], contents[j], atol=1e-9, rtol=0)


def test_a_pattern_written_by_the_layer_is_read_back_later():
    layer = identity_layer()
    patterns = orthonormal(6, D_MODEL)
    with torch.no_grad():
        _, state = layer(patterns[None])  # six novel patterns, six slots
        y, _ = layer(patterns[[2, 4, 0]][None], state)
    torch.testing.assert_close(y[0], patterns[[2, 4, 0]], atol=1e-9, rtol=0)


def test_empty_memory_reads_zeros():
    layer = identity_layer()
    with torch.no_grad():
        y, state = layer(randn(2, 1, D_MODEL))
    assert (y == 0).all() and state.live_entries().tolist() == [1, 1]


def test_padded_batch_equals_each_sequence_alone():
    layer = make_layer(0.5, match_threshold=0.4)
    states = [layer.init_state(1, dtype=torch.float64)]
    states += warm_states(layer, (4, 30))
    stacked = DynamicMemoryState.stack(states)
    assert stacked.live_entries().unique().numel() > 1  # different live counts in one batch
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 9, D_MODEL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_size_bytes_is_exact_in_both_dtypes(dtype):
    layer = DynamicMemoryConfig(memory_size=MEMORY_SIZE, slot_size=12).build(D_MODEL).to(dtype)
    for seq_len in (1, 9, 40):
        with torch.no_grad():
            _, state = layer(torch.randn(2, seq_len, D_MODEL, dtype=dtype))
        assert state.slots.dtype == dtype
        assert layer.state_size_bytes(seq_len, dtype) == state.nbytes_per_sequence()


def test_metrics_report_live_slots_and_counters():
    layer = make_layer(0.5, match_threshold=0.4)
    metrics = warm_state(layer, 2, 30).metrics()
    assert set(metrics) == {"live_entries", "evictions", "merges", "allocations"}
    assert metrics["merges"] + metrics["allocations"] == 30


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"slot_size": 0}, "slot_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"importance_decay": 1.5}, "importance_decay"),
        ({"match_threshold": 1.2}, "match_threshold"),
        ({"importance_decay": 1.0, "forget_threshold": 0.3}, "importance_decay"),
    ],
)
def test_bad_configs_name_the_field(fields, field):
    assert_refused_naming(DynamicMemoryConfig, fields, field)


def test_config_defaults_and_slot_size():
    config = DynamicMemoryConfig()
    assert (config.memory_size, config.importance_decay, config.match_threshold) == (32, 0.9, 0.8)
    assert config.build(D_MODEL).slot_size == D_MODEL
    assert DynamicMemoryConfig(slot_size=5).build(D_MODEL).slot_size == 5
    assert DynamicMemoryConfig(importance_decay=1.0).forget_threshold == 0.0
