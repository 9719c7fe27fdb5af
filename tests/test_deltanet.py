"""DeltaNet: chunkwise == recurrent, chunk invariance, the delta rule's overwrite, gates and the
forget threshold's resets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    UNEVEN_CHUNKS,
    adam_losses,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_states_close,
    randn,
    registry_config,
    run_chunks,
    warm_state,
    warm_states,
    with_config,
)
from pydantic import ValidationError

from memory_models.deltanet import (
    DeltaInputs,
    DeltaNetConfig,
    DeltaNetLayer,
    delta_rule_chunkwise,
    delta_rule_recurrent,
)
from memory_models.registry import memory_config

D_MODEL = 16
KEY_DIM = 8
CHUNK = 8  # small, so that test lengths span several chunks and end in a partial one
# (gated, forget_threshold, conv_size): Gated DeltaNet, with resets (0.9 snaps about a fifth of
# the gates at initialisation), plain DeltaNet, with a conv.
SETTINGS = [(True, 0.0, None), (True, 0.9, None), (False, 0.0, None), (True, 0.0, 4)]


def make_layer(
    gated: bool = True,
    threshold: float = 0.0,
    conv_size: int | None = None,
    chunk_size: int = CHUNK,
    dtype=torch.float64,
) -> DeltaNetLayer:
    config = DeltaNetConfig(
        memory_size=KEY_DIM,
        forget_threshold=threshold,
        gated=gated,
        conv_size=conv_size,
        chunk_size=chunk_size,
        n_heads=2,
    )
    return config.build(D_MODEL).to(dtype)


def hand_inputs(keys, values, beta, decay=None, queries=None) -> DeltaInputs:
    """One sequence, one head: `keys [T, Dk]`, `values [T, Dv]`, `beta [T]`, `decay [T]` (a_t,
    0 meaning a reset); reads with `queries` (default: the keys)."""

    def heads(rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float64)[None, None]  # [1, 1, T, ...]

    decay = heads([1.0] * len(keys) if decay is None else decay)
    return DeltaInputs(
        q=heads(keys if queries is None else queries),
        k=heads(keys),
        v=heads(values),
        beta=heads(beta),
        log_decay=decay.clamp_min(1e-300).log(),
        reset=decay == 0,
    )


def both_rules(inputs: DeltaInputs, memory: torch.Tensor | None = None):
    """Reads `[T, Dv]` and final memory of the recurrent and the chunkwise rule (chunks of 2)."""
    if memory is None:
        memory = torch.zeros(1, 1, inputs.k.shape[-1], inputs.v.shape[-1], dtype=torch.float64)
    results = [delta_rule_recurrent(inputs, memory), delta_rule_chunkwise(inputs, memory, 2)]
    return [(reads[0, 0], final[0, 0]) for reads, final in results]


def test_writing_the_same_key_twice_overwrites():
    """k -> v1 then k -> v2 with beta = 1: reading k returns v2, not v1 + v2 as linear attention
    would; an orthogonal key's association is untouched."""
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    inputs = hand_inputs(
        keys=[e1, e2, e1, e1],
        values=[[1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
        beta=[1.0, 1.0, 1.0, 0.0],
        queries=[e1, e2, e1, e2],
    )
    for reads, memory in both_rules(inputs):
        assert reads[2].tolist() == [0.0, 1.0, 0.0]  # k=e1 reads v2 only
        assert reads[3].tolist() == [0.0, 0.0, 5.0]  # e2 kept its value
        assert memory.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]


def test_write_strength_blends_old_and_new_value():
    """beta = 1/2 moves the association half way: S k = (v1 + v2) / 2."""
    e1 = [1.0, 0.0]
    inputs = hand_inputs(keys=[e1, e1], values=[[4.0, 0.0], [0.0, 2.0]], beta=[1.0, 0.5])
    for reads, _ in both_rules(inputs):
        assert reads.tolist() == [[4.0, 0.0], [2.0, 1.0]]


def test_gate_scales_the_memory_and_zero_resets_it():
    """a_t = 1/2 halves every association before the write; a_t = 0 wipes them all."""
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    inputs = hand_inputs(
        keys=[e1, e2, e2, e2],
        values=[[4.0], [0.0], [0.0], [3.0]],
        beta=[1.0, 0.0, 0.0, 1.0],
        decay=[1.0, 0.5, 1.0, 0.0],
        queries=[e1, e1, e1, e1],
    )
    for reads, memory in both_rules(inputs):
        assert reads[:, 0].tolist() == [4.0, 2.0, 2.0, 0.0]
        assert memory.tolist() == [[0.0], [3.0]]


def test_a_reset_cuts_off_everything_before_it():
    """Whatever came before a snapped gate, the reads from that step on are the same."""
    steps, reset_at = 13, 6
    base = DeltaInputs(
        q=torch.nn.functional.normalize(randn(1, 2, steps, 4), dim=-1),
        k=torch.nn.functional.normalize(randn(1, 2, steps, 4), dim=-1),
        v=randn(1, 2, steps, 3),
        beta=torch.rand(1, 2, steps, dtype=torch.float64),
        log_decay=-torch.rand(1, 2, steps, dtype=torch.float64),
        reset=torch.arange(steps).eq(reset_at).expand(1, 2, steps),
    )
    earlier = torch.arange(steps) < reset_at
    changed = base._replace(
        k=torch.where(earlier[:, None], base.k.flip(-1), base.k),
        v=torch.where(earlier[:, None], randn(1, 2, steps, 3), base.v),
    )
    memory = randn(1, 2, 4, 3)
    for rule in (delta_rule_recurrent, lambda i, m: delta_rule_chunkwise(i, m, 4)):
        reads, final = rule(base, memory)
        reads_changed, final_changed = rule(changed, 2 * memory)
        torch.testing.assert_close(reads_changed[:, :, reset_at:], reads[:, :, reset_at:])
        torch.testing.assert_close(final_changed, final)
        assert (reads_changed[:, :, :reset_at] - reads[:, :, :reset_at]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize(("gated", "threshold", "conv_size"), SETTINGS)
def test_fast_matches_reference(gated, threshold, conv_size, steps):
    layer = make_layer(gated, threshold, conv_size)
    warm = warm_state(layer, 2, 11)
    x = randn(2, steps, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=warm, gradients=[x, *layer.parameters()])


def test_the_threshold_setting_really_resets():
    layer = make_layer(True, 0.9)
    _, reset = layer._decays(randn(2, 63, D_MODEL))
    assert reset.any() and not reset.all()


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_changes_nothing_but_speed(chunk_size):
    layer = make_layer(True, 0.9, chunk_size=CHUNK)
    other = with_config(layer, chunk_size=chunk_size)
    x = randn(2, 40, D_MODEL)
    y, state = layer(x)
    y_other, state_other = other(x)
    torch.testing.assert_close(y_other, y, atol=1e-9, rtol=0)
    assert_states_close(state_other, state)


@pytest.mark.parametrize(("gated", "threshold", "conv_size"), SETTINGS)
def test_streaming_in_chunks_equals_the_full_pass(gated, threshold, conv_size):
    """Calls of 5, 1, 11, 16 tokens against chunk_size 8: splits that do not divide."""
    layer = make_layer(gated, threshold, conv_size)
    x = randn(2, 33, D_MODEL).requires_grad_()
    # The state keeps its autograd history, so gradients agree across calls too.
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS, gradients=[x])


@settings(max_examples=10, deadline=None)
@given(
    calls=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    chunk_size=st.integers(1, 16),
    conv_size=st.sampled_from([None, 2, 3]),
)
def test_any_split_equals_the_full_pass(calls, chunk_size, conv_size):
    layer = make_layer(True, 0.0, conv_size, chunk_size)
    x = randn(2, sum(calls), D_MODEL)
    with torch.no_grad():
        assert_chunked_equals_full(layer, x, calls)


@pytest.mark.parametrize("conv_size", [None, 4])
def test_state_bytes_are_exact_and_flat_in_length(conv_size):
    layer = make_layer(conv_size=conv_size)
    history = 0 if conv_size is None else conv_size - 1
    expected = (2 * KEY_DIM * (D_MODEL // 2) + history * (2 * 2 * KEY_DIM + D_MODEL)) * 8
    for seq_len, calls in [(1, [1]), (33, [5, 1, 11, 16]), (200, [200])]:
        with torch.no_grad():
            _, state = run_chunks(layer, randn(2, seq_len, D_MODEL), None, calls)
        assert state.nbytes_per_sequence() == expected
        assert layer.state_size_bytes(seq_len, torch.float64) == expected
        assert state.live_entries().tolist() == [KEY_DIM, KEY_DIM]
    assert layer.state_size_bytes(10**6, torch.float64) == expected


def gates_and_threshold(layer: DeltaNetLayer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The gates `a_t: [B, H, T]` the layer computes for `x`, and a threshold that catches
    about one in twenty of them."""
    log_decay, _ = layer._decays(x)
    gates = log_decay.exp()
    return gates, gates.flatten().quantile(0.05).item()


def test_threshold_zeroes_exactly_the_gates_under_it():
    """Up to the first gate under the threshold the outputs are the threshold-0 layer's; with it
    they equal the recurrence run on the threshold-0 gates with exactly those set to 0."""
    layer = make_layer()
    warm = warm_state(layer, 2, 9)
    x = randn(2, 40, D_MODEL)
    with torch.no_grad():
        gates, threshold = gates_and_threshold(layer, x)
        snapped = gates < threshold  # [B, H, T]
        y_plain, _ = layer(x, warm)
        y_snapped, state = with_config(layer, forget_threshold=threshold)(x, warm)
        inputs, _ = layer._project(x, warm, layer.short_conv)
        reads, memory = delta_rule_recurrent(inputs._replace(reset=snapped), warm.memory)
    torch.testing.assert_close(y_snapped, layer._merge_heads(reads), atol=1e-9, rtol=0)
    torch.testing.assert_close(state.memory, memory, atol=1e-9, rtol=0)
    for row in range(2):
        first = int(snapped[row].any(0).nonzero()[0])
        assert first > 0, "pick inputs whose first snapped gate is not the first step"
        assert torch.equal(y_snapped[row, :first], y_plain[row, :first])
        assert (y_snapped[row, first] - y_plain[row, first]).abs().max() > 1e-6


def test_a_threshold_under_every_gate_changes_nothing():
    layer = make_layer()
    x = randn(2, 40, D_MODEL)
    with torch.no_grad():
        gates, _ = gates_and_threshold(layer, x)
        y, state = layer(x)
        y_low, state_low = with_config(layer, forget_threshold=0.5 * gates.min().item())(x)
    assert torch.equal(y_low, y) and torch.equal(state_low.memory, state.memory)


def test_ungated_deltanet_refuses_a_threshold():
    with pytest.raises(ValidationError, match="gated=False"):
        memory_config({"kind": "deltanet", "gated": False, "forget_threshold": 0.1})
    layer = make_layer(gated=False)
    assert not any("decay" in name for name, _ in layer.named_parameters())


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"conv_size": 1}, "conv_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"n_heads": 0}, "n_heads"),
    ],
)
def test_bad_settings_name_the_field(override, field):
    assert_refused_naming(registry_config("deltanet"), override, field)


def test_padded_batches_with_a_convolution_equal_each_sequence_alone():
    layer = make_layer(conv_size=3)
    states = warm_states(layer, (1, 20, 7))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 5, D_MODEL))


@pytest.mark.parametrize(
    ("strong", "threshold"), [(False, 0.0), (False, 0.9), (True, 0.0), (True, 1e-6)]
)
def test_float32_stays_finite_and_accurate_over_long_sequences(strong, threshold):
    """T = 512 in calls of 64: gates as initialised (long memory) or strong (log-gates from about
    -45 to -2, products inside a chunk down to e^-900), with and without snapped gates: finite
    outputs and gradients, close to the float64 reference."""
    layer = make_layer(True, threshold, chunk_size=64)
    if strong:
        with torch.no_grad():
            layer.decay_rate_log.fill_(3.0)
            layer.decay.bias.zero_()
    x = randn(2, 512, D_MODEL)
    with torch.no_grad():
        y_ref, s_ref = layer.reference_forward(x)
        _, reset = layer._decays(x)
    assert reset.any() == (threshold > 0)
    fast = with_config(layer).float()
    x32 = x.float().requires_grad_()
    y, state = run_chunks(fast, x32, None, [64] * 8)
    y.square().mean().backward()
    assert torch.isfinite(x32.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.memory.double(), s_ref.memory, atol=1e-5, rtol=0)


def test_has_a_pulse():
    """A few Adam steps on a toy regression lower the loss."""
    layer = make_layer(dtype=torch.float32, conv_size=4)
    x = torch.randn(4, 32, D_MODEL)
    losses = adam_losses(layer, x, torch.roll(x, shifts=1, dims=1), steps=8)
    assert losses[-1] < losses[0]
