"""Small pieces shared by several mechanisms (no mechanism file imports another)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Why linear attention, RetNet and GLA need `n_heads` to divide `d_model`.
VALUE_HEADS_REASON = (
    "each head reads d_model / n_heads value dimensions; pick n_heads that divides d_model"
)


def require_heads_divide(n_heads: int, d_model: int, reason: str = VALUE_HEADS_REASON) -> None:
    """Refuse a head count that does not divide `d_model`, saying why it must (`reason`)."""
    if d_model % n_heads != 0:
        raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}: {reason}")


def require_rotary_heads(n_heads: int, d_model: int) -> None:
    """Refuse a head count that does not cut `d_model` into heads of even width: rotary
    positions turn pairs of dimensions."""
    if d_model % n_heads != 0 or (d_model // n_heads) % 2 != 0:
        raise ValueError(
            f"n_heads={n_heads} does not fit d_model={d_model}: n_heads must divide "
            "d_model into an even head width (rotary pairs); pick n_heads so that "
            "d_model / n_heads is even"
        )


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """`[B, T, H * D]` -> `[B, H, T, D]`."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """`[B, H, T, D]` -> `[B, T, H * D]`."""
    return x.transpose(1, 2).flatten(2)


def chunk_positions(start: Tensor, steps: int) -> Tensor:
    """`[B, T]` long: absolute positions of a chunk of `steps` tokens starting at `start: [B]`."""
    return start[:, None] + torch.arange(steps, device=start.device)


def zero_below(values: Tensor, threshold: float) -> Tensor:
    """`values` with every entry under `threshold` set to 0: a gate snapped shut."""
    return torch.where(values < threshold, torch.zeros_like(values), values)


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al., 2021) at absolute `positions`.

    `x: [B, T, H, Dh]` (Dh even), `positions: [B, T]` long. Scores between rotated queries and
    keys depend only on the position difference, so cached keys stay valid across chunks.
    """
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None] * freqs  # [B, T, half]
    cos = angles.cos()[:, :, None, :].to(x.dtype)  # [B, T, 1, half]
    sin = angles.sin()[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
