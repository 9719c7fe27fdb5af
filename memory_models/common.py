"""Small pieces shared by several mechanisms (no mechanism file imports another)."""

from __future__ import annotations

import torch
from torch import Tensor


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


def keep_above_threshold(share: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Slots to keep: live ones whose attention share is at least `threshold`.

    `share, valid: [B, L]`. With threshold 0 every live slot is kept.
    """
    if threshold <= 0.0:
        return valid.clone()
    return valid & (share >= threshold)


def keep_newest(keep: Tensor, capacity: int) -> Tensor:
    """Narrow `keep: [B, L]` (slots in age order, oldest first) to its newest `capacity` slots."""
    kept_at_or_after = keep.flip(1).long().cumsum(1).flip(1)  # [B, L]
    return keep & (kept_at_or_after <= capacity)


def keep_largest(keep: Tensor, score: Tensor, capacity: int) -> Tensor:
    """Narrow `keep: [B, L]` to the `capacity` kept slots of highest `score` (ties: newest wins)."""
    if keep.shape[1] <= capacity:
        return keep
    length = keep.shape[1]
    # Rank by score, then by age so that ties resolve deterministically towards newer slots.
    age_rank = torch.arange(length, device=score.device, dtype=torch.float64) / (2 * length)
    key = torch.where(keep, score.to(torch.float64) + age_rank * 1e-9, float("-inf"))
    top = key.topk(capacity, dim=1).indices
    chosen = torch.zeros_like(keep).scatter(1, top, True)
    return keep & chosen


def compact_slots(
    keep: Tensor, tensors: list[Tensor], length: int | None = None
) -> tuple[list[Tensor], Tensor]:
    """Move the kept slots of each row to the front, in their original order.

    `keep: [B, L]`; each tensor is `[B, L, ...]` (slot dim 1). Returns the compacted tensors with
    `length` slots (default: the largest kept count in the batch) and the new `valid: [B, length]`.
    Rows keeping fewer slots are padded with zeros behind them. `length` must not be smaller than
    any row's kept count.
    """
    batch, slots = keep.shape
    counts = keep.sum(1)  # [B]
    out_len = int(counts.max().item()) if length is None else length
    if out_len < int(counts.max().item()):
        raise ValueError(f"compact_slots: length {out_len} < kept slots {int(counts.max())}")
    position = torch.arange(slots, device=keep.device).expand(batch, slots)
    order = torch.where(keep, position, position + slots).argsort(dim=1, stable=True)
    order = order[:, :out_len] if out_len <= slots else _pad_index(order, out_len)
    valid = torch.arange(out_len, device=keep.device)[None, :] < counts[:, None]
    out = []
    for t in tensors:
        index = order.view(batch, out_len, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        gathered = t.gather(1, index)
        mask = valid.view(batch, out_len, *([1] * (t.dim() - 2)))
        out.append(torch.where(mask, gathered, torch.zeros((), dtype=t.dtype, device=t.device)))
    return out, valid


def rows_to_slots(
    rows: list[list[tuple[Tensor, int | Tensor, float | Tensor]]], like: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference paths' cache builder: each sequence's `(entry, position, share)` tuples written
    to the front of zero-initialised slots, in order.

    Returns `entries [B, L, D]`, `positions [B, L]` long, `valid [B, L]` bool and `share [B, L]`,
    with L the longest row; `like: [B, T, D]` gives the batch, width, dtype and device.
    """
    batch, _, width = like.shape
    length = max(len(row) for row in rows)
    entries = like.new_zeros(batch, length, width)
    positions = torch.zeros(batch, length, dtype=torch.long, device=like.device)
    valid = torch.zeros(batch, length, dtype=torch.bool, device=like.device)
    share = like.new_zeros(batch, length)
    for b, row in enumerate(rows):
        for n, (entry, position, entry_share) in enumerate(row):
            entries[b, n] = entry
            positions[b, n] = position
            valid[b, n] = True
            share[b, n] = entry_share
    return entries, positions, valid, share


def _pad_index(order: Tensor, length: int) -> Tensor:
    extra = order[:, :1].expand(-1, length - order.shape[1])
    return torch.cat([order, extra], dim=1)
