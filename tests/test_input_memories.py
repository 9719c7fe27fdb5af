"""What holds for both memories of past layer inputs thinned by attention share (Transformer-XL
and the compressive memory); each kind's own rules are in its test file."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import make_layer, states_at_two_thresholds


@pytest.mark.parametrize("kind", ["transformer_xl", "compressive"])
@settings(max_examples=10, deadline=None)
@given(
    thresholds=st.lists(st.floats(0.0, 0.6), min_size=2, max_size=2),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_raising_the_threshold_never_keeps_more_entries(kind, thresholds, steps, seed):
    torch.manual_seed(seed)
    low_threshold, high_threshold = sorted(thresholds)
    low = make_layer(kind, memory_size=6, threshold=low_threshold, d_model=8, n_heads=2)
    kept_low, kept_high = states_at_two_thresholds(low, high_threshold, steps)
    assert (kept_high.live_entries() <= kept_low.live_entries()).all()
    assert (kept_high.evictions >= kept_low.evictions).all()
