"""Linear attention: hand-checked sums, the normaliser, feature maps, and what it refuses.

Fast == reference, chunk invariance, flat state and float32 checks: tests/test_chunked_linear.py.
"""

from __future__ import annotations

import pytest
import torch
from layer_helpers import assert_refused_naming, randn, run_chunks
from pydantic import ValidationError

from memory_models.linear_attention import (
    NORMALISER_EPS,
    LinearAttentionConfig,
    LinearAttentionLayer,
)
from memory_models.registry import memory_config

D_MODEL = 4


def make_layer(**fields) -> LinearAttentionLayer:
    config = LinearAttentionConfig(**{"memory_size": 4, "n_heads": 1, **fields})
    return config.build(D_MODEL).double()


def identity_values(layer: LinearAttentionLayer) -> LinearAttentionLayer:
    """Zero query and key weights (so phi(q) = phi(k) = elu(0) + 1 = 1), values and output = x."""
    eye = torch.eye(D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        layer.query.weight.zero_()
        layer.key.weight.zero_()
        layer.value.weight.copy_(eye)
        layer.out.weight.copy_(eye)
        layer.out.bias.zero_()
    return layer


def test_equal_features_give_the_running_mean_of_the_values():
    layer = identity_values(make_layer())
    x = randn(2, 13, D_MODEL)
    y, state = run_chunks(layer, x, None, [4, 1, 8])
    steps = torch.arange(1, 14, dtype=torch.float64)[None, :, None]
    # o_t = phi(q)^T S_t / phi(q)^T z_t with phi = 1: Dk * sum(v) / (Dk * t + eps).
    expected = 4 * x.cumsum(1) / (4 * steps + NORMALISER_EPS)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(state.normaliser, torch.full((2, 1, 4), 13.0, dtype=torch.float64))
    torch.testing.assert_close(state.memory, x.sum(1)[:, None, None, :].expand(-1, 1, 4, -1))


def test_state_is_the_manual_cumulative_sum_of_features():
    layer = make_layer(n_heads=2, memory_size=3)
    x = randn(2, 21, D_MODEL)
    _, state = run_chunks(layer, x, None, [10, 11])
    phi_k = torch.nn.functional.elu(layer.key(x)) + 1  # [B, T, H * Dk]
    phi_k = phi_k.view(2, 21, 2, 3)
    v = layer.value(x).view(2, 21, 2, 2)
    torch.testing.assert_close(state.normaliser, phi_k.sum(1), atol=1e-12, rtol=0)
    memory = torch.einsum("bthk,bthv->bhkv", phi_k, v)
    torch.testing.assert_close(state.memory, memory, atol=1e-12, rtol=0)


def test_relu_features_with_a_silent_query_read_nothing_and_stay_finite():
    layer = make_layer(feature_map="relu")
    with torch.no_grad():
        layer.query.weight.zero_()  # relu(0) = 0: phi(q)^T z = 0, the eps keeps 0 / eps = 0
    y, _ = layer(randn(2, 9, D_MODEL))
    torch.testing.assert_close(y, layer.out.bias.expand(2, 9, -1), atol=0, rtol=0)


def test_the_two_feature_maps_differ():
    elu = make_layer()
    relu = make_layer(feature_map="relu")
    relu.load_state_dict(elu.state_dict())
    x = randn(1, 7, D_MODEL)
    assert (elu(x)[0] - relu(x)[0]).abs().max() > 1e-3


def test_a_forget_threshold_is_refused_with_a_clear_error():
    with pytest.raises(ValidationError) as error:
        memory_config({"kind": "linear_attention", "forget_threshold": 0.2})
    message = str(error.value)
    assert "forget_threshold=0.2" in message and "nothing to forget" in message
    assert "linear_attention" in message
    assert not LinearAttentionConfig.forgets


def test_the_normaliser_has_one_entry_per_key_dimension():
    state = LinearAttentionConfig(memory_size=6, n_heads=2).build(16).init_state(3)
    assert state.normaliser.shape == (3, 2, 6)
    assert state.live_entries().tolist() == [6, 6, 6]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"memory_size": 0}, "memory_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"feature_map": "softmax"}, "feature_map"),
        ({"decay": 0.9}, "decay"),
    ],
)
def test_bad_configs_name_the_field(fields, name):
    assert_refused_naming(LinearAttentionConfig, fields, name)
