"""Mamba: fast == per-token reference, chunk invariance, the conv state, the decay threshold."""

from __future__ import annotations

import math

import pytest
import torch
from layer_helpers import (
    D_MODEL,
    MEMORY_SIZE,
    UNEVEN_CHUNKS,
    adam_losses,
    assert_chunked_equals_full,
    assert_refused_naming,
    assert_same_gradients,
    assert_states_close,
    make_layer,
    randn,
    run_chunks,
    warm_state,
    with_config,
)
from torch import Tensor
from torch.nn import functional as F

from memory_models.mamba import MambaConfig, MambaLayer, MambaState
from memory_models.saved_activations import saved_for_backward


def mamba(threshold: float = 0.0, **fields) -> MambaLayer:
    return make_layer("mamba", threshold=threshold, **fields)


def paper_forward(
    layer: MambaLayer, x: Tensor, state: MambaState, snapped: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The block written out once more from the paper, for one call from `state`.

    `snapped: [B, T, E, N]` bool marks decays to set to 0. Returns `y: [B, T, D]`, the final SSM
    state `[B, E, N]` and the unsnapped decays `[B, T, E, N]`.
    """
    steps, inner, size = x.shape[1], layer.d_inner, layer.d_state
    branch, gate = (x @ layer.in_proj.weight.T).split(inner, dim=-1)  # [B, T, E]
    padded = torch.cat([state.conv.transpose(1, 2), branch], dim=1)  # [B, K-1+T, E]
    weight = layer.conv.weight[:, 0]  # [E, K]
    conv = sum(padded[:, k : k + steps] * weight[:, k] for k in range(weight.shape[1]))
    u = F.silu(conv + layer.conv.bias)
    low_rank, b, c = (u @ layer.x_proj.weight.T).split([layer.dt_rank, size, size], dim=-1)
    dt = F.softplus(low_rank @ layer.dt_proj.weight.T + layer.dt_proj.bias)  # [B, T, E]
    decays = torch.exp(dt[..., None] * -torch.exp(layer.A_log))  # [B, T, E, N]
    kept = decays if snapped is None else decays.masked_fill(snapped, 0.0)
    h, reads = state.ssm, []
    for t in range(steps):
        h = kept[:, t] * h + (dt[:, t] * u[:, t])[..., None] * b[:, t, None, :]
        reads.append((h * c[:, t, None, :]).sum(-1))
    y = (torch.stack(reads, dim=1) + layer.D * u) * F.silu(gate)
    return y @ layer.out_proj.weight.T, h, decays


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("steps", [1, 33, 63, 100])
@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_fast_matches_reference(threshold, steps, warm):
    """Outputs, final states and gradients into inputs, start state and weights, across the
    fast path's recompute segments (16 steps) and a partial last one."""
    layer = mamba(threshold)
    state = warm_state(layer, 2, 7) if warm else layer.init_state(2, dtype=torch.float64)
    state = MambaState(ssm=state.ssm.requires_grad_(), conv=state.conv.requires_grad_())
    x = randn(2, steps, D_MODEL).requires_grad_()
    y_fast, s_fast = layer(x, state)
    y_ref, s_ref = layer.reference_forward(x, state)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-9, rtol=0)
    assert_states_close(s_fast, s_ref)
    # Weigh the final state in too: its gradient enters the scan's backward on its own.
    weights = torch.randn_like(s_fast.ssm)
    assert_same_gradients(
        torch.cat([y_fast.flatten(), (s_fast.ssm * weights).flatten()]),
        torch.cat([y_ref.flatten(), (s_ref.ssm * weights).flatten()]),
        [x, state.ssm, state.conv, *layer.parameters()],
    )


def saved_bytes_for_backward(layer: MambaLayer, steps: int) -> int:
    """Bytes autograd holds for backward after a forward of one sequence of `steps` tokens
    (distinct storages)."""
    x = randn(1, steps, D_MODEL).requires_grad_()
    _, held = saved_for_backward(lambda: layer(x))
    return held


def test_training_memory_per_token_is_well_under_one_state():
    """The scan saves a state every 16 steps and recomputes the rest, so backward holds the
    activations of the projections per token, not the 2 or more states per token that autograd
    through the step loop would."""
    layer = mamba(memory_size=64)
    per_token = (saved_bytes_for_backward(layer, 128) - saved_bytes_for_backward(layer, 64)) / 64
    one_state = layer.d_inner * layer.d_state * 8
    assert per_token < one_state / 2


def test_reference_matches_the_paper_written_out():
    layer = mamba()
    state = warm_state(layer, 2, 5)
    x = randn(2, 20, D_MODEL)
    y_paper, h_paper, _ = paper_forward(layer, x, state)
    y_ref, s_ref = layer.reference_forward(x, state)
    torch.testing.assert_close(y_ref, y_paper, atol=1e-12, rtol=0)
    torch.testing.assert_close(s_ref.ssm, h_paper, atol=1e-12, rtol=0)


@pytest.mark.parametrize("conv_size", [1, 4])
@pytest.mark.parametrize("chunks", [UNEVEN_CHUNKS, [1] * 33, [32, 1], [2, 31]])
@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_any_split_into_calls_equals_the_full_pass(threshold, chunks, conv_size):
    """Streaming with the carried state, single tokens (serving) included, is the full pass."""
    layer = mamba(threshold, conv_size=conv_size)
    x = randn(2, 33, D_MODEL).requires_grad_()
    # The state keeps its autograd history, so gradients agree across splits too.
    assert_chunked_equals_full(layer, x, chunks, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("conv_size", [1, 2, 4])
def test_state_is_flat_in_t_and_its_bytes_are_exact(conv_size):
    layer = mamba(conv_size=conv_size, expand=3)
    inner = 3 * D_MODEL
    expected = (inner * MEMORY_SIZE + inner * (conv_size - 1)) * 8
    state = None
    for seen, chunk in [(1, 1), (4, 3), (64, 60), (200, 136)]:
        with torch.no_grad():
            _, state = layer(randn(2, chunk, D_MODEL), state)
        assert layer.state_size_bytes(seen, torch.float64) == expected
        assert state.nbytes_per_sequence() == expected
        assert state.ssm.shape == (2, inner, MEMORY_SIZE)
        assert state.conv.shape == (2, inner, conv_size - 1)
        assert state.live_entries().tolist() == [MEMORY_SIZE, MEMORY_SIZE]
    assert layer.state_size_bytes(10, torch.float32) == expected // 2


def test_conv_state_holds_the_last_inputs_of_the_x_branch():
    layer = mamba(conv_size=4)
    x = randn(2, 9, D_MODEL)
    with torch.no_grad():
        branch = (x @ layer.in_proj.weight.T)[..., : layer.d_inner]  # [B, T, E]
        _, early = layer(x[:, :2])
        _, late = run_chunks(layer, x, None, [2, 1, 6])
    zeros = torch.zeros(2, layer.d_inner, 1, dtype=torch.float64)
    # Before conv_size - 1 tokens the missing ones are zeros: the paper's causal zero padding.
    torch.testing.assert_close(early.conv, torch.cat([zeros, branch[:, :2].mT], 2), atol=0, rtol=0)
    torch.testing.assert_close(late.conv, branch[:, -3:].mT, atol=1e-15, rtol=0)


@pytest.mark.parametrize("conv_size", [1, 2, 4])
def test_without_the_ssm_a_step_sees_exactly_the_last_conv_size_inputs(conv_size):
    """B = 0 leaves h at 0, so y_t = out_proj(D * SiLU(conv_t) * SiLU(z_t)), by hand."""
    layer = mamba(conv_size=conv_size)
    rows = slice(layer.dt_rank, layer.dt_rank + layer.d_state)
    with torch.no_grad():
        layer.x_proj.weight[rows] = 0.0
    x = randn(1, 12, D_MODEL)
    t = 9
    with torch.no_grad():
        y, _ = run_chunks(layer, x, None, [1] * 12)
        branch, gate = (x[0, t - conv_size + 1 : t + 1] @ layer.in_proj.weight.T).split(
            layer.d_inner, dim=-1
        )  # [K, E]
        conv = (branch.T * layer.conv.weight[:, 0]).sum(1) + layer.conv.bias  # [E]
        by_hand = (layer.D * F.silu(conv) * F.silu(gate[-1])) @ layer.out_proj.weight.T
        torch.testing.assert_close(y[0, t], by_hand, atol=1e-12, rtol=0)
        for moved, changes in [(t - conv_size, False), (t - conv_size + 1, True)]:
            if moved < 0:
                continue
            other = x.clone()
            other[:, moved] += 1.0
            y_other, _ = run_chunks(layer, other, None, [1] * 12)
            assert ((y_other[0, t] - y[0, t]).abs().max() > 1e-6) == changes, moved


def test_a_and_dt_start_as_in_the_paper():
    config = MambaConfig(memory_size=16, dt_min=0.002, dt_max=0.05)
    layer = config.build(64)
    assert layer.d_inner == 128 and layer.dt_rank == 4
    A = -torch.exp(layer.A_log)  # [E, N]
    assert A.shape == (128, 16)
    torch.testing.assert_close(A, -torch.arange(1.0, 17.0).expand(128, 16), atol=0, rtol=1e-6)
    assert torch.equal(layer.D, torch.ones(128))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # Log-uniform: about as many channels in each decade-half of the range.
    below_geometric_mean = (dt < math.sqrt(0.002 * 0.05)).float().mean()
    assert 0.3 < below_geometric_mean < 0.7
    assert layer.dt_proj.weight.abs().max() <= 4**-0.5
    assert layer.x_proj.weight.shape == (4 + 2 * 16, 128)


def threshold_sparing_the_first_step(decays: Tensor, count: int = 40) -> float:
    """A threshold over the `count` smallest decays of the later steps and under every decay of
    step 0 (so each row's first snap comes later), strictly between two distinct decays."""
    at_start = decays[:, 0].min()
    later = decays[:, 1:].flatten().unique()  # sorted
    k = min(count, int((later < at_start).sum()))
    assert k > 0, "the smallest decay is at step 0; pick other data"
    return float((later[k - 1] + torch.minimum(later[k], at_start)) / 2)


def test_threshold_snaps_exactly_the_decays_at_or_under_it():
    """Equal to the threshold-0 layer until a row's first snapped decay, and to the paper's
    equations with exactly the decays under the threshold set to 0."""
    base = mamba()
    state = warm_state(base, 2, 6)
    x = randn(2, 40, D_MODEL)
    with torch.no_grad():
        _, _, decays = paper_forward(base, x, state)
        threshold = threshold_sparing_the_first_step(decays)
        snapped = decays <= threshold
        y_expected, h_expected, _ = paper_forward(base, x, state, snapped)
        y_base, _ = base(x, state)
        y, s = with_config(base, forget_threshold=threshold)(x, state)
    torch.testing.assert_close(y, y_expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.ssm, h_expected, atol=1e-9, rtol=0)
    steps_with_a_snap = snapped.flatten(2).any(2)  # [B, T]
    assert steps_with_a_snap.any()
    for row in range(2):
        if not steps_with_a_snap[row].any():
            assert torch.equal(y[row], y_base[row])
            continue
        first = int(steps_with_a_snap[row].nonzero()[0])
        assert first > 0
        assert torch.equal(y[row, :first], y_base[row, :first])
        assert (y[row, first] - y_base[row, first]).abs().max() > 1e-9


def test_threshold_under_every_decay_changes_nothing():
    base = mamba()
    state = warm_state(base, 2, 6)
    x = randn(2, 40, D_MODEL)
    with torch.no_grad():
        _, _, decays = paper_forward(base, x, state)
        layer = with_config(base, forget_threshold=float(decays.min()) / 2)
        y_base, s_base = base(x, state)
        y, s = layer(x, state)
    assert torch.equal(y, y_base)
    assert_states_close(s, s_base, atol=0)


def test_threshold_over_every_decay_leaves_no_memory_beyond_the_conv():
    """Every decay snapped: h_t = dt_t * B_t * u_t, so step t forgets the inputs before the conv
    window, however long ago the SSM saw them."""
    layer = mamba(0.9999)
    x = randn(1, 20, D_MODEL)
    with torch.no_grad():
        _, _, decays = paper_forward(layer, x, layer.init_state(1, dtype=torch.float64))
        assert decays.max() < 0.9999
        y, _ = layer(x)
        early = x.clone()
        early[:, :10] = randn(1, 10, D_MODEL)
        y_early, _ = layer(early)
    torch.testing.assert_close(y_early[:, 13:], y[:, 13:], atol=1e-12, rtol=0)
    assert (y_early[:, 12] - y[:, 12]).abs().max() > 1e-6


def test_decays_that_underflow_to_zero_stay_finite():
    layer = mamba(dtype=torch.float32)
    with torch.no_grad():
        layer.dt_proj.bias.fill_(100.0)  # dt ~ 100: exp(dt * A) is exactly 0 in float32
    x = torch.randn(2, 30, D_MODEL, requires_grad=True)
    y, state = layer(x)
    y_ref, _ = layer.reference_forward(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(state.ssm).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_float32_over_long_sequences_stays_finite_and_close_to_float64():
    layer = mamba(dtype=torch.float32, memory_size=16)
    exact = with_config(layer, forget_threshold=0.0).double()
    x = torch.randn(2, 512, D_MODEL)
    with torch.no_grad():
        y, state = run_chunks(layer, x, None, [64] * 8)
        y_exact, _ = exact(x.double())
    assert torch.isfinite(y).all() and torch.isfinite(state.ssm).all()
    error = (y.double() - y_exact).abs().max() / y_exact.abs().max()
    assert error < 1e-5


def test_adam_lowers_a_toy_loss():
    torch.manual_seed(1)
    layer = MambaConfig(memory_size=8).build(D_MODEL)
    x = torch.randn(4, 24, D_MODEL)
    target = x.roll(3, dims=1)  # recall the input from three steps back
    losses = adam_losses(layer, x, target, steps=15)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": None}, "memory_size"),
        ({"expand": 0}, "expand"),
        ({"conv_size": 0}, "conv_size"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"d_state": 4}, "d_state"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(MambaConfig, fields, name)


def test_config_defaults_and_json():
    config = MambaConfig()
    assert (config.memory_size, config.expand, config.conv_size) == (16, 2, 4)
    assert config.dt_rank is None and (config.dt_min, config.dt_max) == (1e-3, 0.1)
    assert MambaConfig.model_validate_json(config.model_dump_json()) == config
    assert MambaConfig(dt_rank=3).build(D_MODEL).dt_proj.weight.shape == (2 * D_MODEL, 3)
