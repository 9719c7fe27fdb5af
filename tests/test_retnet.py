"""RetNet: the multi-scale gammas, decay of the state, per-head threshold, norm and gate.

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
    with_config,
)

from memory_models.retnet import RetNetConfig, RetNetLayer, retention_decays

D_MODEL = 16


def make_layer(threshold: float = 0.0, **fields) -> RetNetLayer:
    config = RetNetConfig(memory_size=8, forget_threshold=threshold, **fields)
    return config.build(D_MODEL).double()


def test_gammas_are_the_papers():
    gammas = retention_decays(4)
    assert gammas.tolist() == [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256]
    layer = make_layer()
    log_decay = layer._log_decay(randn(2, 5, D_MODEL))
    assert log_decay.shape == (2, 4, 5, 1)  # one decay per head, the same at every step
    torch.testing.assert_close(log_decay.exp(), gammas[None, :, None, None].expand(2, 4, 5, 1))


def test_without_input_each_head_decays_its_state_by_its_gamma():
    layer = make_layer()
    x = torch.zeros(1, 10, D_MODEL, dtype=torch.float64)
    x[:, 0] = randn(1, D_MODEL)
    # No biases in q, k, v: after the first token nothing is written, the state only decays.
    _, first = layer(x[:, :1])
    _, later = layer(x)
    expected = retention_decays(4)[None, :, None, None] ** 9 * first.memory
    torch.testing.assert_close(later.memory, expected, atol=1e-12, rtol=0)


def test_thresholds_up_to_the_smallest_gamma_change_nothing():
    base = make_layer()
    state = warm_state(base, 2, 7)
    x = randn(2, 19, D_MODEL)
    with torch.no_grad():
        y, s = base(x, state)
        for threshold in (0.3, 0.9, 0.96875):
            y_t, s_t = with_config(base, forget_threshold=threshold)(x, state)
            assert torch.equal(y_t, y) and torch.equal(s_t.memory, s.memory)


def test_a_head_under_the_threshold_keeps_only_the_current_token():
    base = make_layer()
    x = randn(2, 12, D_MODEL)
    # Under 0.99: heads 0 and 1.
    kept, cut = states_at_thresholds(base, x, warm_state(base, 2, 7), [0.0, 0.99])
    last_token = last_token_write(base, x)
    torch.testing.assert_close(cut.memory[:, :2], last_token[:, :2], atol=1e-12, rtol=0)
    assert torch.equal(cut.memory[:, 2:], kept.memory[:, 2:])


def test_output_is_normalised_per_head_and_gated():
    layer = make_layer()
    layer.norm.eps = 0.0  # so that the scale invariance below is exact
    x = randn(2, 9, D_MODEL)
    y, _ = layer(x)
    with torch.no_grad():
        layer.value.weight[:4] *= 7.0  # head 0's values only: GroupNorm undoes it
    torch.testing.assert_close(layer(x)[0], y, atol=1e-10, rtol=0)
    with torch.no_grad():
        layer.gate.weight.zero_()  # swish(0) = 0 closes the gate
    torch.testing.assert_close(layer(x)[0], torch.zeros_like(y), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"gamma": 0.9}, "gamma"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(RetNetConfig, fields, name)
