"""What every memory-layer test needs: layers in float64, random inputs, chunked streaming,
state and gradient comparison, and the checks several mechanisms' tests make (fast path against
the reference, chunked against full, padded batches, thresholds, refused settings). One copy
here; the per-mechanism files and the contract tests import it."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor
from torch.nn import functional as F

from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.registry import REGISTRY, memory_config
from memory_models.state import MemoryState

D_MODEL = 16
MEMORY_SIZE = 8
UNEVEN_CHUNKS = (5, 1, 11, 16)  # 33 tokens: odd lengths, a single-token chunk, uneven splits
# Thresholds from none to most, for "a higher threshold never keeps more".
THRESHOLD_LADDER = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8)

Forward = Callable[[Tensor, MemoryState | None], tuple[Tensor, MemoryState]]
#: What an input that one of two outputs does not depend on may do in `assert_same_gradients`:
#: "same" (no gradient on either side), "zero" (no gradient counts as a zero one) or "error"
#: (every input must get a gradient on both sides).
Unused = Literal["same", "zero", "error"]


def build(config: MemoryConfig, d_model: int = D_MODEL, dtype=torch.float64) -> MemoryLayer:
    return config.build(d_model).to(dtype)


def make_layer(
    kind: str,
    *,
    memory_size: int | None = MEMORY_SIZE,
    threshold: float = 0.0,
    d_model: int = D_MODEL,
    dtype=torch.float64,
    **fields,
) -> MemoryLayer:
    """A fresh layer of `kind` (float64 unless told), its own fields in `fields`."""
    config = REGISTRY[kind](memory_size=memory_size, forget_threshold=threshold, **fields)
    return build(config, d_model, dtype)


def with_config(layer: MemoryLayer, **update) -> MemoryLayer:
    """A layer with the same weights and other config fields (another threshold, size...)."""
    config = layer.config.model_copy(update=update)
    first = next(layer.parameters(), None)
    dtype = first.dtype if first is not None else torch.float64
    other = build(config, layer.d_model, dtype)
    other.load_state_dict(layer.state_dict())
    return other


def randn(*shape: int, dtype=torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


def run_chunks(
    forward: Forward, x: Tensor, state: MemoryState | None, chunks: Sequence[int]
) -> tuple[Tensor, MemoryState]:
    """Stream `x: [B, T, D]` through `forward` in consecutive chunks, carrying the state."""
    outputs, start = [], 0
    for size in chunks:
        y, state = forward(x[:, start : start + size], state)
        outputs.append(y)
        start += size
    assert start == x.shape[1], f"chunks {list(chunks)} do not cover {x.shape[1]} steps"
    return torch.cat(outputs, dim=1), state


def orthonormal(count: int, width: int) -> Tensor:
    """`[count, width]`: `count` random orthonormal rows (count <= width)."""
    return torch.linalg.qr(randn(width, count))[0].T


def warm_state(layer: MemoryLayer, batch: int, tokens: int) -> MemoryState:
    """A non-empty state from `tokens` random steps (no autograd history)."""
    first = next(layer.parameters())
    with torch.no_grad():
        return layer(randn(batch, tokens, layer.d_model, dtype=first.dtype))[1]


def warm_states(layer: MemoryLayer, lengths: Sequence[int]) -> list[MemoryState]:
    """One state of batch 1 per history length: sessions that have seen different amounts."""
    return [warm_state(layer, 1, n) for n in lengths]


def assert_states_close(a: MemoryState, b: MemoryState, atol: float = 1e-9) -> None:
    """Same type, same shapes; floats within `atol`, masks and counters exactly equal."""
    assert type(a) is type(b), (type(a), type(b))
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        assert tensor.shape == other.shape, (name, tensor.shape, other.shape)
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, other, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(tensor, other), name


def grads(y: Tensor, weights: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    """Gradients of the weighted sum `(y * weights).sum()` with respect to `inputs`."""
    return torch.autograd.grad((y * weights).sum(), list(inputs), allow_unused=True)


def assert_same_gradients(
    y_a: Tensor,
    y_b: Tensor,
    inputs: Sequence[Tensor],
    atol: float = 1e-9,
    *,
    unused: Unused = "same",
    inputs_b: Sequence[Tensor] | None = None,
) -> None:
    """One random weighting of `y_a` and of `y_b` has the same gradients with respect to
    `inputs` (with respect to `inputs_b` for `y_b`, when given), within `atol`."""
    weights = torch.randn_like(y_a)
    grads_a = grads(y_a, weights, inputs)
    grads_b = grads(y_b, weights, inputs if inputs_b is None else inputs_b)
    for g_a, g_b, t in zip(grads_a, grads_b, inputs, strict=True):
        if unused == "zero":
            g_a = torch.zeros_like(t) if g_a is None else g_a
            g_b = torch.zeros_like(t) if g_b is None else g_b
        if unused == "error":
            assert g_a is not None and g_b is not None, "an input got no gradient"
        assert (g_a is None) == (g_b is None)
        if g_a is not None:
            torch.testing.assert_close(g_a, g_b, atol=atol, rtol=0)


def assert_fast_matches_reference(
    layer: MemoryLayer,
    x: Tensor,
    chunks: Sequence[int] | None = None,
    state: MemoryState | None = None,
    atol: float = 1e-9,
    *,
    gradients: Sequence[Tensor] | None = None,
    unused: Unused = "same",
) -> tuple[Tensor, MemoryState]:
    """The fast path and `reference_forward`, streamed over the same chunks from the same state,
    give the same outputs and states, and the same gradients with respect to `gradients` (when
    given). Returns the fast path's outputs and final state."""
    chunks = chunks or [x.shape[1]]
    y_fast, s_fast = run_chunks(layer, x, state, chunks)
    y_ref, s_ref = run_chunks(layer.reference_forward, x, state, chunks)
    assert y_fast.shape == x.shape
    torch.testing.assert_close(y_fast, y_ref, atol=atol, rtol=0)
    assert_states_close(s_fast, s_ref, atol)
    if gradients is not None:
        assert_same_gradients(y_fast, y_ref, gradients, atol, unused=unused)
    return y_fast, s_fast


def assert_chunked_equals_full(
    layer: MemoryLayer,
    x: Tensor,
    chunks: Sequence[int],
    *,
    full: MemoryLayer | None = None,
    gradients: Sequence[Tensor] | None = None,
    unused: Unused = "same",
) -> None:
    """Streaming `x` through `layer` in `chunks`, carrying the state, equals one pass of `full`
    (default: `layer`) over all of it: outputs, states and gradients with respect to
    `gradients` (when given; the state keeps its autograd history across chunks)."""
    y_full, s_full = (full or layer)(x)
    y_chunked, s_chunked = run_chunks(layer, x, None, chunks)
    torch.testing.assert_close(y_chunked, y_full, atol=1e-9, rtol=0)
    assert_states_close(s_chunked, s_full)
    if gradients is not None:
        assert_same_gradients(y_chunked, y_full, gradients, unused=unused)


def trimmed_to(row: MemoryState, like: MemoryState) -> MemoryState:
    """`row` (batch 1) cut to `like`'s slot counts (dim 1 of each tensor of more than one dim),
    after checking that every mask marks the cut slots empty."""
    fields = {}
    for name, t in row.tensors().items():
        if t.dim() > 1:
            slots = like.tensors()[name].shape[1]
            assert not (t.dtype == torch.bool and t[:, slots:].any()), f"{name}: live slot cut"
            t = t[:, :slots]
        fields[name] = t
    return type(row)(**fields)


def assert_padded_batch_equals_each_alone(
    layer: MemoryLayer, states: Sequence[MemoryState], step: Tensor
) -> None:
    """Sessions whose states differ in slot counts, stacked into one batch (the shorter padded
    with empty slots), take `step: [B, T, D]` exactly as each alone: the same outputs, and each
    row of the batched state is the session's own once its padding is cut off."""
    with torch.no_grad():
        y_batched, s_batched = layer(step, layer.state_type.stack(states))
        for i, (state, row) in enumerate(zip(states, s_batched.split(1), strict=True)):
            y_alone, s_alone = layer(step[i : i + 1], state)
            torch.testing.assert_close(y_batched[i : i + 1], y_alone, atol=1e-9, rtol=0)
            assert row.live_entries().equal(s_alone.live_entries())
            assert_states_close(trimmed_to(row, s_alone), s_alone)


def with_empty_slots(state: MemoryState, extra: int = 3) -> MemoryState:
    """`state` with `extra` empty slots (zeros, False masks) appended to every slot dim."""
    return type(state)(
        **{
            name: torch.cat([t, torch.zeros_like(t[:, :extra])], 1) if t.dim() > 1 else t
            for name, t in state.tensors().items()
        }
    )


def assert_empty_slots_change_nothing(layer: MemoryLayer, state: MemoryState, x: Tensor) -> None:
    """Extra empty slots in `state` change neither the outputs for `x` nor the next state."""
    with torch.no_grad():
        y, s = layer(x, state)
        y_wide, s_wide = layer(x, with_empty_slots(state))
    torch.testing.assert_close(y_wide, y, atol=1e-12, rtol=0)
    assert_states_close(s_wide, s)


def assert_higher_threshold_never_keeps_more(
    base: MemoryLayer,
    x: Tensor,
    state: MemoryState | None,
    thresholds: Sequence[float] = THRESHOLD_LADDER,
    held: Callable[[MemoryState], Tensor] = lambda state: state.live_entries(),
    message: str = "the threshold must really evict",
) -> list[Tensor]:
    """Stepping `x` from `state` with `base`'s weights at rising `thresholds`, each holds at most
    what the one before held (`held(state)`, `[B]`), and the last holds less somewhere. Returns
    what each held."""
    live = [held(after) for after in states_at_thresholds(base, x, state, thresholds)]
    for looser, stricter in itertools.pairwise(live):
        assert (stricter <= looser).all()
    assert (live[-1] < live[0]).any(), message
    return live


def states_at_thresholds(
    base: MemoryLayer, x: Tensor, state: MemoryState | None, thresholds: Sequence[float]
) -> list[MemoryState]:
    """The states after `x` from `state` with `base`'s weights at each of `thresholds`."""
    with torch.no_grad():
        return [with_config(base, forget_threshold=t)(x, state)[1] for t in thresholds]


def states_at_two_thresholds(
    low: MemoryLayer, high_threshold: float, steps: int
) -> tuple[MemoryState, MemoryState]:
    """The states after `steps` random tokens from one warm state (batch 3, 10 tokens at
    threshold 0) with `low` and with its weights at `high_threshold`."""
    high = with_config(low, forget_threshold=high_threshold)
    state = warm_state(with_config(low, forget_threshold=0.0), 3, 10)
    x = randn(3, steps, low.d_model)
    with torch.no_grad():
        return low(x, state)[1], high(x, state)[1]


def last_token_write(layer: MemoryLayer, x: Tensor) -> Tensor:
    """`[B, H, Dk, Dv]`: `k v^T` of the last token of `x` in a matrix-memory layer, all that a
    memory wiped at that step holds after it."""
    batch = x.shape[0]
    with torch.no_grad():
        k = layer.key(x[:, -1]).view(batch, layer.n_heads, layer.key_dim)
        v = layer.value(x[:, -1]).view(batch, layer.n_heads, layer.value_dim)
    return k[..., :, None] * v[..., None, :]


def streamed_states(
    layer: MemoryLayer, chunks: Sequence[int], batch: int, scale: float = 1.0
) -> Iterator[MemoryState]:
    """The state after each of `chunks` of random inputs (standard normal times `scale`, in the
    layer's dtype), streamed without autograd."""
    dtype = next(layer.parameters()).dtype
    state = None
    for size in chunks:
        with torch.no_grad():
            _, state = layer(scale * randn(batch, size, layer.d_model, dtype=dtype), state)
        yield state


def assert_state_is_detached(layer: MemoryLayer, first_len: int = 9) -> None:
    """The state keeps no autograd history: a later call's output gets no gradient into an
    earlier call's inputs (segment recurrence with a stop-gradient memory; `first_len` closes
    the segments it opens)."""
    first = randn(2, first_len, layer.d_model).requires_grad_()
    second = randn(2, 4, layer.d_model).requires_grad_()
    _, state = layer(first)
    assert not any(t.requires_grad for t in state.tensors().values())
    y, _ = layer(second, state)
    grad_first, grad_second = torch.autograd.grad(y.sum(), [first, second], allow_unused=True)
    assert grad_first is None or torch.count_nonzero(grad_first) == 0
    assert torch.count_nonzero(grad_second) > 0


def assert_first_slot_is_read(
    layer: MemoryLayer, state: MemoryState, x: Tensor, field: str
) -> None:
    """Changing slot 0 of the state's `field` changes the output for the first token of `x`."""
    y, _ = layer(x, state)
    changed = dataclasses.replace(state, **{field: getattr(state, field).clone()})
    getattr(changed, field)[:, 0] += 1.0
    y_changed, _ = layer(x, changed)
    assert (y_changed[:, 0] - y[:, 0]).abs().max() > 1e-6


def assert_finite(y: Tensor, state: MemoryState) -> None:
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for t in state.tensors().values())


def adam_losses(layer: MemoryLayer, x: Tensor, target: Tensor, steps: int) -> list[float]:
    """The mean squared error of `layer(x)` against `target` at each of `steps` Adam steps
    (learning rate 1e-2), before the step."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(layer(x)[0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def registry_config(kind: str) -> Callable[..., MemoryConfig]:
    """Keyword settings of `kind` validated through the registry, as a dict from JSON is."""
    return lambda **fields: memory_config({"kind": kind, **fields})


def assert_refused_naming(make: Callable[..., object], fields: dict, name: str) -> None:
    """`make(**fields)` (a config class, or `registry_config(kind)`) fails validation with an
    error that names `name`."""
    with pytest.raises(ValidationError, match=re.escape(name)):
        make(**fields)
