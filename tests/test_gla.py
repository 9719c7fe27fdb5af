"""GLA: the gate's shape and formula, per-key-row decay, the threshold wiping rows, output gate.

Fast == reference, chunk invariance, flat state and float32 checks: tests/test_chunked_linear.py.
"""

from __future__ import annotations

import pytest
import torch
from layer_helpers import (
    assert_refused_naming,
    last_token_write,
    randn,
    states_at_thresholds,
    warm_state,
)

from memory_models.gla import GATE_TEMPERATURE, GLAConfig, GLALayer

D_MODEL = 16


def make_layer(threshold: float = 0.0, **fields) -> GLALayer:
    config = GLAConfig(memory_size=8, n_heads=2, forget_threshold=threshold, **fields)
    return config.build(D_MODEL).double()


def constant_gates(layer: GLALayer, logits: torch.Tensor) -> torch.Tensor:
    """Make the gate ignore x (logit per key dim, same in every head); the decays `[Dk]`."""
    with torch.no_grad():
        layer.gate_up.weight.zero_()
        layer.gate_up.bias.copy_(logits.repeat(layer.n_heads))
    return torch.sigmoid(logits) ** (1 / GATE_TEMPERATURE)


def test_decay_has_one_value_per_head_step_and_key_dimension():
    layer = make_layer()
    x = randn(3, 11, D_MODEL)
    log_decay = layer._log_decay(x)
    assert log_decay.shape == (3, 2, 11, 8)
    logits = layer.gate_up(layer.gate_down(x)).view(3, 11, 2, 8).transpose(1, 2)
    # alpha = sigmoid(x W1 W2 + b)^(1/16), computed in log space.
    torch.testing.assert_close(log_decay.exp(), torch.sigmoid(logits) ** (1 / 16))
    assert (log_decay < 0).all()


def test_gate_is_low_rank():
    layer = make_layer(gate_rank=3)
    assert layer.gate_down.weight.shape == (3, D_MODEL)
    assert layer.gate_up.weight.shape == (2 * 8, 3)


def test_without_input_each_key_row_decays_by_its_own_gate():
    layer = make_layer()
    alpha = constant_gates(layer, torch.linspace(-3.0, 3.0, 8, dtype=torch.float64))
    x = torch.zeros(1, 10, D_MODEL, dtype=torch.float64)
    x[:, 0] = randn(1, D_MODEL)
    _, first = layer(x[:, :1])
    _, later = layer(x)
    expected = alpha[None, None, :, None] ** 9 * first.memory  # row i scaled by alpha_i^9
    torch.testing.assert_close(later.memory, expected, atol=1e-12, rtol=0)


def test_the_threshold_wipes_exactly_the_rows_whose_decay_is_under_it():
    base = make_layer()
    logits = torch.zeros(8, dtype=torch.float64)
    logits[[0, 5]] = -30.0  # decay e^(-30/16) = 0.15 on rows 0 and 5; 0.5^(1/16) = 0.96 elsewhere
    constant_gates(base, logits)
    x = randn(2, 13, D_MODEL)
    kept, cut = states_at_thresholds(base, x, warm_state(base, 2, 6), [0.0, 0.5])
    last_token = last_token_write(base, x)
    wiped, untouched = [0, 5], [1, 2, 3, 4, 6, 7]
    torch.testing.assert_close(cut.memory[:, :, wiped], last_token[:, :, wiped], atol=1e-12, rtol=0)
    assert torch.equal(cut.memory[:, :, untouched], kept.memory[:, :, untouched])


def test_output_gate_closes_at_zero():
    layer = make_layer()
    with torch.no_grad():
        layer.out_gate.weight.zero_()
        layer.out_gate.bias.zero_()  # swish(0) = 0
    y, _ = layer(randn(2, 9, D_MODEL))
    assert torch.equal(y, torch.zeros_like(y))


def test_the_gate_has_a_logit_per_head_and_key_dimension():
    layer = GLAConfig(memory_size=6, n_heads=2).build(16)
    assert layer.gate_up.weight.shape == (12, 16)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"gate_rank": 0}, "gate_rank"),
        ({"forget_threshold": -0.1}, "forget_threshold"),
        ({"tau": 8}, "tau"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(GLAConfig, fields, name)
