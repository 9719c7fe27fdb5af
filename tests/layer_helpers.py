"""What every memory-layer test needs: layers in float64, random inputs, chunked streaming and
state comparison. One copy here; the per-mechanism files and the contract tests import it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.registry import REGISTRY
from memory_models.state import MemoryState

D_MODEL = 16
MEMORY_SIZE = 8
UNEVEN_CHUNKS = (5, 1, 11, 16)  # 33 tokens: odd lengths, a single-token chunk, uneven splits

Forward = Callable[[Tensor, MemoryState | None], tuple[Tensor, MemoryState]]


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


def warm_state(layer: MemoryLayer, batch: int, tokens: int) -> MemoryState:
    """A non-empty state from `tokens` random steps (no autograd history)."""
    first = next(layer.parameters())
    with torch.no_grad():
        return layer(randn(batch, tokens, layer.d_model, dtype=first.dtype))[1]


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


def assert_fast_matches_reference(
    layer: MemoryLayer,
    x: Tensor,
    chunks: Sequence[int] | None = None,
    state: MemoryState | None = None,
    atol: float = 1e-9,
) -> tuple[Tensor, Tensor]:
    """The fast path and `reference_forward`, streamed over the same chunks from the same state,
    give the same outputs and states. Returns both outputs (for gradient checks)."""
    chunks = chunks or [x.shape[1]]
    y_fast, s_fast = run_chunks(layer, x, state, chunks)
    y_ref, s_ref = run_chunks(layer.reference_forward, x, state, chunks)
    assert y_fast.shape == x.shape
    torch.testing.assert_close(y_fast, y_ref, atol=atol, rtol=0)
    assert_states_close(s_fast, s_ref, atol)
    return y_fast, y_ref
