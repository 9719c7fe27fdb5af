"""Decayed linear attention: the shared chunkwise kernel against the step-by-step recurrence, and
what its three layers (linear_attention, retnet, gla) share: fast == reference, any split into
calls == the full pass, a flat state, the forget threshold's exact effect, float32 accuracy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    D_MODEL,
    adam_losses,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_finite,
    assert_padded_batch_equals_each_alone,
    assert_states_close,
    make_layer,
    randn,
    run_chunks,
    warm_state,
    warm_states,
    with_config,
)
from torch.nn import functional as F

from memory_models.chunked_linear import (
    chunked_decayed_attention,
    recurrent_decayed_attention,
    snap_log_decay,
)
from memory_models.layer import MemoryLayer

KINDS = ["linear_attention", "retnet", "gla"]
# A threshold that snaps some decays of each forgetting kind (retnet's gammas are >= 0.96875;
# gla's decays sit near 1 at initialisation).
ACTING_THRESHOLD = {"retnet": 0.99, "gla": 0.95}
SETTINGS = [("linear_attention", 0.0), ("retnet", 0.0), ("gla", 0.0), *ACTING_THRESHOLD.items()]
DECAYS = ["none", "per_head", "per_key"]


def layer_of(kind: str, threshold: float = 0.0, **fields) -> MemoryLayer:
    return make_layer(kind, threshold=threshold, n_heads=2, **fields)


def kernel_inputs(
    decay: str, steps: int = 37, resets: float = 0.0, dtype=torch.float64
) -> tuple[torch.Tensor, ...]:
    """q, k, v, log_decay (or None), state: batch 2, 3 heads, Dk 5, Dv 4."""
    q, k = randn(2, 3, steps, 5, dtype=dtype), randn(2, 3, steps, 5, dtype=dtype)
    v, state = randn(2, 3, steps, 4, dtype=dtype), randn(2, 3, 5, 4, dtype=dtype)
    if decay == "none":
        return q, k, v, None, state
    width = 1 if decay == "per_head" else 5
    log_decay = F.logsigmoid(randn(2, 3, steps, width, dtype=dtype) + 2.0)
    log_decay = log_decay.masked_fill(torch.rand_like(log_decay) < resets, float("-inf"))
    return q, k, v, log_decay, state


def assert_kernels_agree(inputs, chunk_size: int, atol: float = 1e-9) -> None:
    """Outputs, final state and the gradients of every input."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    o_ref, s_ref = recurrent_decayed_attention(*leaves)
    o_fast, s_fast = chunked_decayed_attention(*leaves, chunk_size)
    torch.testing.assert_close(o_fast, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(s_fast, s_ref, atol=atol, rtol=0)
    w_o, w_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    present = [t for t in leaves if t is not None]
    g_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), present)
    g_fast = torch.autograd.grad((o_fast * w_o).sum() + (s_fast * w_s).sum(), present)
    for fast, ref in zip(g_fast, g_ref, strict=True):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
@pytest.mark.parametrize("resets", [0.0, 0.2])
@pytest.mark.parametrize("decay", DECAYS)
def test_kernel_matches_the_recurrence(decay, resets, chunk_size):
    if decay == "none" and resets:
        pytest.skip("no decay, no reset")
    assert_kernels_agree(kernel_inputs(decay, resets=resets), chunk_size)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 40),
    chunk_size=st.integers(1, 20),
    decay=st.sampled_from(DECAYS),
    resets=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_kernel_matches_the_recurrence_at_any_length_and_chunk_size(
    steps, chunk_size, decay, resets
):
    assert_kernels_agree(kernel_inputs(decay, steps, resets), chunk_size)


def test_all_zero_decays_keep_only_the_current_token_without_nan():
    q, k, v, log_decay, state = kernel_inputs("per_key")
    log_decay = torch.full_like(log_decay, float("-inf")).requires_grad_()
    state = state.requires_grad_()
    o, final = chunked_decayed_attention(q, k, v, log_decay, state, chunk_size=8)
    torch.testing.assert_close(o, (q * k).sum(-1, keepdim=True) * v, atol=1e-12, rtol=0)
    torch.testing.assert_close(final, k[:, :, -1, :, None] * v[:, :, -1, None, :])
    g_decay, g_state = torch.autograd.grad(o.sum() + final.sum(), [log_decay, state])
    assert torch.equal(g_decay, torch.zeros_like(g_decay))  # a snapped decay is a constant
    assert torch.equal(g_state, torch.zeros_like(g_state))  # wiped at the first step


def test_a_reset_cuts_everything_before_it_exactly():
    q, k, v, log_decay, state = kernel_inputs("per_head")
    log_decay[:, :, 20] = float("-inf")
    o, _ = chunked_decayed_attention(q, k, v, log_decay, state, chunk_size=16)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[:, :, :20] = randn(2, 3, 20, 5)
    changed_v[:, :, :20] = randn(2, 3, 20, 4)
    o_changed, _ = chunked_decayed_attention(q, changed_k, changed_v, log_decay, 5 * state, 16)
    assert torch.equal(o_changed[:, :, 20:], o[:, :, 20:])


def test_strong_finite_decays_underflow_to_zero_without_nan():
    q, k, v, log_decay, state = kernel_inputs("per_key", resets=0.2)
    strong = torch.where(torch.rand_like(log_decay) < 0.3, -1e4, log_decay)
    assert_kernels_agree((q, k, v, strong, state), chunk_size=16)


@pytest.mark.parametrize("decay", ["per_head", "per_key"])
def test_float32_over_a_long_sequence_stays_close_to_float64(decay):
    inputs64 = kernel_inputs(decay, steps=2048, resets=0.001)
    q, k, v, log_decay, state = inputs64
    # Decays as the layers make them: near 1 (gla's tau = 16), so memory reaches far back.
    inputs64 = (q, k, v, log_decay / 16, state)
    o64, s64 = recurrent_decayed_attention(*inputs64)
    inputs32 = [t.float() for t in inputs64]
    o32, s32 = chunked_decayed_attention(*inputs32, chunk_size=64)
    assert (o32.double() - o64).abs().max() <= 1e-5 * o64.abs().max()
    assert (s32.double() - s64).abs().max() <= 1e-5 * s64.abs().max()


def test_snap_compares_in_log_space():
    log_decay = torch.tensor([0.0, -0.1, -0.5, -2.0, float("-inf")])
    snapped = snap_log_decay(log_decay, threshold=0.5)  # log 0.5 = -0.693
    assert snapped[:3].equal(log_decay[:3]) and torch.isneginf(snapped[3:]).all()
    assert snap_log_decay(log_decay, 0.0) is log_decay


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("steps", [1, 33, 63])
@pytest.mark.parametrize(("kind", "threshold"), SETTINGS)
def test_fast_matches_reference(kind, threshold, steps, warm):
    layer = layer_of(kind, threshold, chunk_size=16)
    state = warm_state(layer, 2, 11) if warm else None
    x = randn(2, steps, D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, state=state, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("calls", [[33], [1, 7, 3, 22], [16, 17], [5, 1, 11, 16]])
@pytest.mark.parametrize("chunk_size", [64, 5, 8])
@pytest.mark.parametrize(("kind", "threshold"), SETTINGS)
def test_any_split_into_calls_equals_the_full_pass(kind, threshold, chunk_size, calls):
    """Chunk sizes that do not divide T, calls shorter than a chunk, single-token calls."""
    full = layer_of(kind, threshold)
    layer = with_config(full, chunk_size=chunk_size)
    x = randn(2, 33, D_MODEL).requires_grad_()
    # The state keeps its autograd history, so gradients agree across splits too.
    assert_chunked_equals_full(layer, x, calls, full=full, gradients=[x])


@pytest.mark.parametrize("kind", KINDS)
def test_memory_size_is_the_key_dimension(kind):
    layer = make_layer(kind, memory_size=6, n_heads=2)
    assert layer.query.weight.shape == (12, 16) and layer.key.weight.shape == (12, 16)
    assert layer.init_state(3).memory.shape == (3, 2, 6, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_state_is_flat_in_sequence_length_and_counted_exactly(kind):
    layer = layer_of(kind)
    heads, key_dim, value_dim = 2, 8, D_MODEL // 2
    extra = heads * key_dim if kind == "linear_attention" else 0  # the normaliser z
    expected = (heads * key_dim * value_dim + extra) * 8
    assert {layer.state_size_bytes(t, torch.float64) for t in (1, 100, 100_000)} == {expected}
    state = None
    for calls in ([1], [30, 40]):
        with torch.no_grad():
            _, state = run_chunks(layer, randn(3, sum(calls), D_MODEL), state, calls)
        assert state.nbytes_per_sequence() == expected
        assert state.live_entries().tolist() == [key_dim] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batches_equal_each_sequence_alone_state_included(kind):
    layer = layer_of(kind)
    states = warm_states(layer, (2, 17, 9))
    assert_padded_batch_equals_each_alone(layer, states, randn(3, 5, D_MODEL))


def snapped_reference(layer: MemoryLayer, x: torch.Tensor, threshold: float, state, monkeypatch):
    """The threshold-0 layer's reference path with exactly the decays under `threshold` set to 0."""
    raw = layer._log_decay(x)  # [B, H, T, Dk or 1], before any threshold
    zeroed = raw.masked_fill(raw.exp() < threshold, float("-inf"))
    monkeypatch.setattr(layer, "_log_decay", lambda _: zeroed)
    y, _ = layer.reference_forward(x, state)
    monkeypatch.undo()
    return y, raw


@pytest.mark.parametrize("kind", list(ACTING_THRESHOLD))
def test_threshold_snaps_exactly_the_decays_under_it(kind, monkeypatch):
    threshold = ACTING_THRESHOLD[kind]
    base = layer_of(kind)
    snapped = with_config(base, forget_threshold=threshold)
    state = warm_state(base, 2, 9)
    x = randn(2, 33, D_MODEL)
    with torch.no_grad():
        y_base, _ = base(x, state)
        y_snapped, _ = snapped(x, state)
        y_expected, raw = snapped_reference(base, x, threshold, state, monkeypatch)
    torch.testing.assert_close(y_snapped, y_expected, atol=1e-9, rtol=0)
    under = (raw.exp() < threshold).flatten(start_dim=3).any(-1).any(1)  # [B, T]
    assert under.any(), "the threshold must act somewhere in this test"
    for b in range(2):
        first = int(under[b].float().argmax()) if under[b].any() else x.shape[1]
        torch.testing.assert_close(y_snapped[b, :first], y_base[b, :first], atol=1e-12, rtol=0)
        if first < x.shape[1]:
            assert (y_snapped[b, first:] - y_base[b, first:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", list(ACTING_THRESHOLD))
def test_a_threshold_under_every_decay_changes_nothing(kind):
    base = layer_of(kind)
    state = warm_state(base, 2, 9)
    x = randn(2, 33, D_MODEL)
    with torch.no_grad():
        lowest = float(base._log_decay(x).exp().min())
        y_base, s_base = base(x, state)
        y_low, s_low = with_config(base, forget_threshold=0.999 * lowest)(x, state)
    assert torch.equal(y_low, y_base)
    assert_states_close(s_low, s_base, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_layer_streams_long_sequences_close_to_float64(kind):
    layer32 = make_layer(kind, n_heads=2, dtype=torch.float32)
    layer64 = with_config(layer32).double()
    x = torch.randn(2, 1024, D_MODEL)
    with torch.no_grad():
        y32, _ = run_chunks(layer32, x, None, [64] * 16)
        y64, _ = layer64(x.double())
    assert torch.isfinite(y32).all()
    assert (y32.double() - y64).abs().max() <= 1e-5 * y64.abs().max()


@pytest.mark.parametrize(("kind", "threshold"), SETTINGS)
def test_float32_has_a_pulse(kind, threshold):
    """512 tokens in calls of 64 stay finite, and a few Adam steps lower a toy loss."""
    torch.manual_seed(1)
    layer = make_layer(kind, threshold=threshold, n_heads=2, dtype=torch.float32)
    x = torch.randn(4, 512, D_MODEL)
    with torch.no_grad():
        assert_finite(*run_chunks(layer, x, None, [64] * 8))
    target = torch.roll(x[:, :64], shifts=1, dims=1)  # recall the previous token
    losses = adam_losses(layer, x[:, :64], target, steps=8)
    assert losses[-1] < losses[0]
