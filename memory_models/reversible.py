"""Reversible residual blocks (Gomez et al., 2017), as the Reformer uses them (Kitaev et al., 2020,
section 3): training stores no per-block activations and recomputes them in the backward pass.

The residual stream is two copies of the embedding, `(x1, x2) = (x, x)`. Each block maps

    y1 = x1 + Memory(norm(x2)),        y2 = x2 + MLP(norm(y1)),

so its inputs follow from its outputs:

    x2 = y2 - MLP(norm(y1)),           x1 = y1 - Memory(norm(x2)).

The stack's output is the mean `(y1 + y2) / 2`, one stream of width d_model as reformer-pytorch
does; the paper's code concatenates the two streams instead, which would double the head's width
and break its tie to the embedding.

`reversible_forward` runs the stack inside one `torch.autograd.Function`: the forward keeps only
the two final streams and each block's incoming memory state (carried from the previous segment,
detached, and small: a state is bounded by its `memory_size`); the backward walks the blocks from
the last, rebuilding each block's inputs from its outputs and recomputing its two halves under
autograd, one block at a time. Activation memory is thus flat in depth. `coupled_forward` is the
same coupling under plain autograd (every activation kept), for inference, for the reference
path and to check the gradients against.

What a memory layer must allow for this (every registered kind does; the tests check each one):
its forward must be a deterministic function of its input and incoming state (no sampling), so
the recomputation repeats it. Discrete decisions (LSH buckets, evictions, slot allocation) are
recomputed from rebuilt inputs, which carry rounding error; a decision that sits within rounding
of its boundary could flip, as in any reversible network. An auxiliary loss (the compressive
reconstruction loss) is returned as an output of the function and differentiated again in the
recomputation, so its gradient is exact too. The output states are those of the forward, without
autograd history; the incoming states get no gradient (truncated backprop cuts there anyway).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from memory_models.layer import MemoryLayer
from memory_models.state import MemoryState


class CoupledBlock(Protocol):
    """What the coupling needs of a block: its two residual halves and its parameters."""

    memory: MemoryLayer

    def mix(
        self, x: Tensor, state: MemoryState | None, reference: bool = False
    ) -> tuple[Tensor, MemoryState]: ...

    def feed(self, x: Tensor) -> Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


def coupled_forward(
    blocks: Sequence[CoupledBlock],
    x: Tensor,
    states: Sequence[MemoryState | None],
    reference: bool = False,
) -> tuple[Tensor, list[MemoryState]]:
    """The reversible coupling under plain autograd. `x: [B, T, D]` -> mean of the two streams."""
    x1 = x2 = x
    new_states = []
    for block, state in zip(blocks, states, strict=True):
        mixed, state = block.mix(x2, state, reference)
        x1 = x1 + mixed
        x2 = x2 + block.feed(x1)
        new_states.append(state)
    return (x1 + x2) / 2, new_states


def reversible_forward(
    blocks: Sequence[CoupledBlock], x: Tensor, states: Sequence[MemoryState | None]
) -> tuple[Tensor, list[MemoryState], Tensor | None]:
    """The same coupling, recomputing activations in the backward pass.

    Returns the mean of the two streams `[B, T, D]`, the blocks' new states, and the sum of the
    memory layers' auxiliary losses (None when no layer has one), differentiable through the
    recomputation.
    """
    states = [None if state is None else state.detach() for state in states]
    params = [p for block in blocks for p in block.parameters()]
    return _ReversibleStack.apply(blocks, states, x, *params)


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, states, x, *params):
        # `params` are unused here: passing them as inputs is what lets backward return their
        # gradients (to autograd.grad and DDP alike) rather than writing into `.grad`.
        y1 = y2 = x
        new_states, aux_losses = [], []
        for block, state in zip(blocks, states, strict=True):
            mixed, state = block.mix(y2, state)
            y1 = y1 + mixed
            y2 = y2 + block.feed(y1)
            new_states.append(state)
            aux = block.memory.auxiliary_loss()
            if aux is not None:
                aux_losses.append(aux.detach())
        ctx.blocks, ctx.states = blocks, states
        # An unused output's gradient stays None (not zeros): an auxiliary loss left out of the
        # objective is then not differentiated at all, as under plain autograd.
        ctx.set_materialize_grads(False)
        ctx.autocast = _autocast_settings(x.device.type)
        ctx.save_for_backward(y1, y2)
        aux_total = torch.stack(aux_losses).sum() if aux_losses else None
        return (y1 + y2) / 2, new_states, aux_total

    @staticmethod
    def backward(ctx, grad_out, _grad_states, grad_aux):
        y1, y2 = ctx.saved_tensors
        dy1 = dy2 = torch.zeros_like(y1) if grad_out is None else grad_out / 2
        param_grads: list[Tensor | None] = []
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for block, state in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
                (y1, y2), (dy1, dy2), grads = _invert_block(
                    block, state, y1, y2, dy1, dy2, grad_aux
                )
                param_grads = grads + param_grads
        return None, None, dy1 + dy2, *param_grads


def _invert_block(
    block: CoupledBlock,
    state: MemoryState | None,
    y1: Tensor,
    y2: Tensor,
    dy1: Tensor,
    dy2: Tensor,
    grad_aux: Tensor | None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[Tensor | None]]:
    """One block backwards: its inputs rebuilt from its outputs, their gradients, and the
    gradients of its parameters (None where a parameter took no part)."""
    params = list(block.parameters())
    trainable = [p for p in params if p.requires_grad]
    # y2 = x2 + F(y1): F's part of the gradient, then x2.
    y1 = y1.detach().requires_grad_()
    fed = block.feed(y1)
    grads_feed = torch.autograd.grad(fed, [y1, *trainable], dy2, allow_unused=True)
    dy1 = dy1 + grads_feed[0]
    x2 = (y2 - fed).detach().requires_grad_()
    # y1 = x1 + G(x2), with the block's incoming state: G's part, then x1.
    mixed, _ = block.mix(x2, state)
    outputs, seeds = [mixed], [dy1]
    aux = block.memory.auxiliary_loss()
    if aux is not None and grad_aux is not None:
        outputs.append(aux)
        seeds.append(grad_aux)
    grads_mix = torch.autograd.grad(outputs, [x2, *trainable], seeds, allow_unused=True)
    x1 = (y1 - mixed).detach()
    summed = iter(_add(grads_feed[1:], grads_mix[1:]))
    param_grads = [next(summed) if p.requires_grad else None for p in params]
    return (x1, x2.detach()), (dy1, dy2 + grads_mix[0]), param_grads


def _add(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Elementwise sum of two gradient lists where None means zero."""
    return [u if v is None else v if u is None else u + v for u, v in zip(a, b, strict=True)]


def _autocast_settings(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast state of the forward, so the recomputation runs in the same precision."""
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
