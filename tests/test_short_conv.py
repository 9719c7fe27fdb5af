"""The short causal convolution before the fixed-state memories: the module on its own, and every
kind that takes `conv_size` held to the contract with it on (fast path against the reference in
float64, chunked streaming against the full pass, exact state bytes)."""

from __future__ import annotations

import pytest
import torch
from layer_helpers import (
    UNEVEN_CHUNKS,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_refused_naming,
    make_layer,
    randn,
    registry_config,
    run_chunks,
)

from memory_models.short_conv import ShortConvolution

D_MODEL = 16
CONV_KINDS = ("linear_attention", "retnet", "gla", "deltanet")


def conv_layer(kind: str, conv_size: int | None, threshold: float = 0.0):
    return make_layer(kind, threshold=threshold, d_model=D_MODEL, conv_size=conv_size)


def convolution(size: int | None, width: int = 6) -> ShortConvolution:
    return ShortConvolution(width, size).to(torch.float64)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_one_call_equals_the_step_by_step_windows_and_carries_the_history(size):
    conv = convolution(size)
    x = randn(2, 13, 6)
    history = conv.empty_history(2, dtype=torch.float64)
    fast, fast_history = run_chunks(conv, x, history, (5, 1, 7))
    slow, slow_history = conv.stepwise(x, history)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast_history, slow_history, atol=0, rtol=0)
    torch.testing.assert_close(fast_history, x[:, -(size - 1) :], atol=0, rtol=0)


@pytest.mark.parametrize("size", [2, 4])
def test_an_output_sees_exactly_its_last_size_inputs(size):
    conv = convolution(size)
    x = randn(1, 12, 6)
    history = conv.empty_history(1, dtype=torch.float64)
    y, _ = conv(x, history)
    t = 8
    for moved, changes in [(t - size, False), (t - size + 1, True), (t, True), (t + 1, False)]:
        nudged = x.clone()
        nudged[0, moved] += 1.0
        y_nudged, _ = conv(nudged, history)
        assert (y_nudged[0, t] != y[0, t]).any().item() is changes, (moved, changes)


def test_without_a_size_inputs_pass_through_and_nothing_is_kept():
    conv = convolution(None)
    x = randn(2, 5, 6)
    history = conv.empty_history(2, dtype=torch.float64)
    assert history.shape == (2, 0, 6) and conv.history_numbers() == 0
    for run in (conv, conv.stepwise):
        y, after = run(x, history)
        assert y is x and after.shape == (2, 0, 6)
    assert list(conv.parameters()) == []


@pytest.mark.parametrize("conv_size", [2, 4])
@pytest.mark.parametrize("kind", CONV_KINDS)
def test_fast_path_matches_reference_with_the_convolution(kind, conv_size):
    threshold = 0.0 if kind == "linear_attention" else 0.3
    layer = conv_layer(kind, conv_size, threshold)
    x = randn(3, sum(UNEVEN_CHUNKS), D_MODEL).requires_grad_()
    assert_fast_matches_reference(layer, x, UNEVEN_CHUNKS, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_streaming_with_the_convolution_equals_the_full_pass(kind):
    layer = conv_layer(kind, 3)
    x = randn(2, sum(UNEVEN_CHUNKS), D_MODEL).requires_grad_()
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_the_history_is_in_the_state_and_its_bytes_are_exact(kind):
    without, with_conv = conv_layer(kind, None), conv_layer(kind, 4)
    width = 2 * with_conv.n_heads * with_conv.key_dim + D_MODEL  # q, k and v
    extra = 3 * width * 8  # float64
    for seq_len in (1, 9, 40):
        with torch.no_grad():
            _, state = with_conv(randn(2, seq_len, D_MODEL))
        assert state.conv.shape == (2, 3, width)
        assert with_conv.state_size_bytes(seq_len, torch.float64) == state.nbytes_per_sequence()
        assert with_conv.state_size_bytes(seq_len, torch.float64) == (
            without.state_size_bytes(seq_len, torch.float64) + extra
        )


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_a_one_tap_convolution_is_refused_naming_the_field(kind):
    assert_refused_naming(registry_config(kind), {"conv_size": 1}, "conv_size")
