"""How the kinds with heads split `d_model` among them: the widths each refuses (one check in
`memory_models/common.py`), and those rounded up so that any width works."""

from __future__ import annotations

import pytest
from layer_helpers import assert_fast_matches_reference, make_layer, randn

from memory_models.registry import REGISTRY

# Rotary positions turn pairs of dimensions: these kinds need an even head width.
ROTARY_KINDS = ["attention", "sparse", "reformer", "hierarchical", "retrieval"]
# These need heads that divide d_model (each head reads d_model / n_heads value dimensions).
VALUE_HEAD_KINDS = ["linear_attention", "retnet", "gla", "deltanet"]
# These round the head width up instead: (kind, d_model, n_heads) that do not divide.
ROUNDED = [
    ("transformer_xl", 10, 4),
    ("transformer_xl", 9, 2),
    ("transformer_xl", 8, 1),
    ("compressive", 10, 4),
    ("compressive", 9, 2),
    ("compressive", 7, 1),
]


@pytest.mark.parametrize(("n_heads", "d_model"), [(3, 16), (4, 12)])
@pytest.mark.parametrize("kind", ROTARY_KINDS)
def test_heads_without_an_even_width_are_refused(kind, n_heads, d_model):
    with pytest.raises(ValueError, match="n_heads"):
        REGISTRY[kind](n_heads=n_heads).build(d_model)


@pytest.mark.parametrize("kind", VALUE_HEAD_KINDS)
def test_heads_that_do_not_divide_d_model_are_refused(kind):
    with pytest.raises(ValueError, match="n_heads=3"):
        REGISTRY[kind](n_heads=3).build(16)


@pytest.mark.parametrize(("kind", "d_model", "n_heads"), ROUNDED)
def test_widths_that_do_not_divide_into_heads(kind, d_model, n_heads):
    layer = make_layer(kind, d_model=d_model, n_heads=n_heads)
    assert_fast_matches_reference(layer, randn(2, 12, d_model), [5, 7])
