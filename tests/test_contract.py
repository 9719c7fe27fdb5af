"""The memory-layer contract, checked for every kind in the registry with no special cases.

A new mechanism is covered by adding it to `memory_models.registry.REGISTRY`.
"""

from __future__ import annotations

import layer_helpers
import pytest
import torch
from layer_helpers import (
    UNEVEN_CHUNKS,
    assert_chunked_equals_full,
    assert_fast_matches_reference,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_states_close,
    registry_config,
    run_chunks,
)
from pydantic import ValidationError

from memory_models.layer import MemoryLayer
from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config

D_MODEL = 32
MEMORY_SIZE = 8
KINDS = list(REGISTRY)
# 0, and a threshold that acts: the midpoint of the kind's declared `threshold_range`.
THRESHOLDS = ["zero", "acting"]


def threshold_of(kind: str, which: str) -> float:
    if which == "zero":
        return 0.0
    acting = REGISTRY[kind].acting_thresholds(1)
    if not acting:
        pytest.skip(f"{kind} has nothing to forget (forget_threshold must be 0)")
    return acting[0]


def make_layer(kind: str, threshold: float | str = 0.0, dtype=torch.float64) -> MemoryLayer:
    if isinstance(threshold, str):
        threshold = threshold_of(kind, threshold)
    if threshold > 0 and not REGISTRY[kind].forgets:
        pytest.skip(f"{kind} has nothing to forget (forget_threshold must be 0)")
    return layer_helpers.make_layer(
        kind, memory_size=MEMORY_SIZE, threshold=threshold, d_model=D_MODEL, dtype=dtype
    )


def test_registry_is_explicit_and_consistent():
    assert set(KINDS) == {
        "lstm",
        "gru",
        "attention",
        "transformer_xl",
        "compressive",
        "memory_network",
        "dynamic_memory",
        "hierarchical",
        "sparse",
        "deltanet",
        "retrieval",
        "mamba",
        "linear_attention",
        "retnet",
        "gla",
        "reformer",
    }
    for kind, config_cls in REGISTRY.items():
        config = config_cls()
        assert config.kind == kind
        layer = config.build(D_MODEL)
        assert isinstance(layer, MemoryLayer)
        assert isinstance(layer.init_state(2), layer.state_type)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_bound_settings_are_declared(kind):
    """Exactly the settings that change a parameter's shape are declared shape-bound."""
    config_cls = REGISTRY[kind]
    small = config_cls(memory_size=MEMORY_SIZE).build(D_MODEL).state_dict()
    large = config_cls(memory_size=2 * MEMORY_SIZE).build(D_MODEL).state_dict()
    reshaped = any(small[name].shape != large[name].shape for name in small)
    assert set(small) == set(large)
    assert reshaped == ("memory_size" in config_cls.shape_bound)
    assert "forget_threshold" not in config_cls.shape_bound


@pytest.mark.parametrize("kind", KINDS)
def test_movable_settings_change_in_place_like_a_fresh_layer(kind):
    """A capacity controller moves memory_size (and the threshold) during a run: the reconfigured
    layer computes what a layer built with those settings and the same weights computes."""
    layer = make_layer(kind, dtype=torch.float64)
    movable = REGISTRY[kind].movable_settings()
    update = {"memory_size": MEMORY_SIZE // 2} if "memory_size" in movable else {}
    if REGISTRY[kind].forgets:
        update["forget_threshold"] = 0.2
    with torch.no_grad():
        _, state = layer(torch.randn(2, 20, D_MODEL, dtype=torch.float64))
        fresh = layer_helpers.with_config(layer, **update)
        layer.reconfigure(**update)
        x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
        y_moved, s_moved = layer(x, state)
        y_fresh, s_fresh = fresh(x, state)
    torch.testing.assert_close(y_moved, y_fresh, atol=0, rtol=0)
    assert_states_close(s_moved, s_fresh, atol=0)
    bound = REGISTRY[kind].shape_bound
    if bound:
        with pytest.raises(ValueError, match=f"kind '{kind}' cannot change memory_size"):
            layer.reconfigure(memory_size=3)


@pytest.mark.parametrize("kind", [kind for kind in KINDS if REGISTRY[kind].forgets])
def test_a_threshold_inside_its_declared_range_acts(kind):
    """Every kind that forgets says where its threshold does something (`threshold_range`,
    used by sweeps and by the tests above); at its midpoint the outputs change."""
    low, high = REGISTRY[kind].threshold_range
    assert 0.0 < low < high < 1.0
    layer = make_layer(kind)
    acting = layer_helpers.with_config(layer, forget_threshold=threshold_of(kind, "acting"))
    x = torch.randn(2, 48, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.equal(layer(x)[0], acting(x)[0]), f"{kind}: the threshold is idle"


@pytest.mark.parametrize("kind", [kind for kind in KINDS if not REGISTRY[kind].forgets])
def test_a_threshold_without_anything_to_forget_is_refused(kind):
    assert REGISTRY[kind].threshold_range is None
    with pytest.raises(ValidationError, match="nothing to forget"):
        memory_config({"kind": kind, "forget_threshold": 0.1})


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_finite_gradients(kind):
    layer = make_layer(kind, dtype=torch.float32)
    x = torch.randn(3, 17, D_MODEL, requires_grad=True)
    y, state = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert isinstance(state, layer.state_type) and state.batch_size == 3
    (y.square().mean() + (layer.auxiliary_loss() or 0)).backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 24, D_MODEL, dtype=torch.float64)
    y, _ = layer(x)
    for t in (0, 7, 22):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        y_changed, _ = layer(changed)
        torch.testing.assert_close(y_changed[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_matches_reference_in_chunks(kind, threshold):
    layer = make_layer(kind, threshold)
    x = torch.randn(3, sum(UNEVEN_CHUNKS), D_MODEL, dtype=torch.float64, requires_grad=True)
    assert_fast_matches_reference(layer, x, UNEVEN_CHUNKS, gradients=[x, *layer.parameters()])


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_full_pass(kind, threshold):
    """The contract every kind holds: a stream's outputs and state do not depend on how it is cut
    into calls, at every threshold (see `memory_models.layer`)."""
    layer = make_layer(kind, threshold)
    x = torch.randn(3, sum(UNEVEN_CHUNKS), D_MODEL, dtype=torch.float64)
    assert_chunked_equals_full(layer, x, UNEVEN_CHUNKS)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("kind", KINDS)
def test_memory_never_exceeds_its_size(kind, threshold):
    layer = make_layer(kind, threshold, dtype=torch.float32)
    state = None
    for chunk in (1, 7, 30, 3, 64):
        with torch.no_grad():
            _, state = layer(torch.randn(4, chunk, D_MODEL) * 3, state)
        assert (state.live_entries() <= MEMORY_SIZE).all()


@pytest.mark.parametrize("kind", KINDS)
def test_long_streams_stay_finite(kind):
    """Thousands of steps in float32, inputs from 0.01 to 100 in scale, forgetting on where the
    mechanism forgets: outputs, state and then gradients stay finite, the memory in its bound."""
    layer = make_layer(kind, "acting" if REGISTRY[kind].forgets else "zero", dtype=torch.float32)
    state = None
    with torch.no_grad():
        for chunk in range(10):
            scale = 10.0 ** (chunk % 5 - 2)
            y, state = layer(torch.randn(2, 300, D_MODEL) * scale, state)
            assert torch.isfinite(y).all(), f"chunk {chunk} at scale {scale}"
            assert all(torch.isfinite(t).all() for t in state.tensors().values())
            assert (state.live_entries() <= MEMORY_SIZE).all()
    x = torch.randn(2, 16, D_MODEL, requires_grad=True)
    y, _ = layer(x, state)
    (y.square().mean() + (layer.auxiliary_loss() or 0)).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_state_size_bytes_matches_the_state(kind):
    for threshold in THRESHOLDS:
        layer = make_layer(kind, threshold, dtype=torch.float32)
        for seq_len in (1, 5, 33):
            with torch.no_grad():
                _, state = run_chunks(layer, torch.randn(2, seq_len, D_MODEL), None, [seq_len])
            predicted = layer.state_size_bytes(seq_len, torch.float32)
            if threshold == "zero":
                assert predicted == state.nbytes_per_sequence(), (seq_len, threshold)
            else:
                assert predicted >= state.nbytes_per_sequence(), (seq_len, threshold)


@pytest.mark.parametrize("kind", KINDS)
def test_stack_then_split_is_identity(kind):
    layer = make_layer(kind)
    states = []
    for _ in range(3):
        with torch.no_grad():
            _, state = layer(torch.randn(1, 9, D_MODEL, dtype=torch.float64))
        states.append(state)
    stacked = layer.state_type.stack(states)
    assert stacked.batch_size == 3
    for original, back in zip(states, stacked.split(1), strict=True):
        assert_states_close(original, back, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_of_different_lengths_batch_together(kind):
    """Serving stacks sessions that have seen different numbers of tokens into one forward."""
    layer = make_layer(kind)
    histories = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in (3, 20, 11)]
    with torch.no_grad():
        states = [layer(h)[1] for h in histories]
    step = torch.randn(3, 4, D_MODEL, dtype=torch.float64)
    assert_padded_batch_equals_each_alone(layer, states, step)


@pytest.mark.parametrize("kind", KINDS)
def test_detach_and_to(kind):
    layer = make_layer(kind, dtype=torch.float32)
    x = torch.randn(2, 5, D_MODEL, requires_grad=True)
    _, state = layer(x)
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.tensors().values())
    doubled = detached.to(dtype=torch.float64)
    for name, tensor in doubled.tensors().items():
        original = state.tensors()[name]
        expected = torch.float64 if original.is_floating_point() else original.dtype
        assert tensor.dtype == expected, name


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_json(kind):
    config = SequenceModelConfig(
        vocab_size=50, d_model=D_MODEL, memory={"kind": kind, "memory_size": 12}
    )
    again = SequenceModelConfig.model_validate_json(config.model_dump_json())
    assert again == config and type(again.memory) is REGISTRY[kind]
    assert memory_config(config.memory.model_dump()) == config.memory


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"memory_size": -4}, "memory_size"),
        ({"memory_size": 0}, "memory_size"),
        ({"forget_threshold": 1.0}, "forget_threshold"),
        ({"forget_threshold": -0.1}, "forget_threshold"),
        ({"memroy_size": 8}, "memroy_size"),
    ],
)
def test_bad_configs_name_the_field(kind, override, field):
    assert_refused_naming(registry_config(kind), override, field)


def test_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValidationError) as error:
        memory_config({"kind": "hopfield"})
    message = str(error.value)
    assert "hopfield" in message and "lstm" in message


def test_configs_are_frozen():
    config = REGISTRY["lstm"]()
    with pytest.raises(ValidationError):
        config.memory_size = 3
