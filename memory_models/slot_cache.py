"""Bookkeeping of the slot caches several mechanisms keep (key-value caches, summary banks,
stored layer inputs): the empty cache, which slots stay (threshold, newest, highest share),
compaction, and the same rules over Python lists for the reference paths.

Slots sit at dim 1 in age order, oldest first; a bool `valid: [B, L]` marks the live ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memory_models.state import MemoryState


def slot_bytes(numbers: int, dtype: torch.dtype, share: bool = True) -> int:
    """Bytes of one cache slot: `numbers` values of `dtype`, a long position, a bool mask and,
    where eviction tracks it, the slot's share."""
    value_bytes = torch.finfo(dtype).bits // 8
    return numbers * value_bytes + 8 + 1 + (value_bytes if share else 0)


def empty_cache(
    batch_size: int,
    device: torch.device | str | None,
    dtype: torch.dtype,
    heads: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """An empty slot cache's fields by name: `positions` (long), `valid` (bool) and `share`,
    `[B, 0]` each, the `[B]` long counters `position` and `evictions` and, given `heads = (H,
    Dh)`, `keys` and `values` `[B, 0, H, Dh]`."""

    def slots(kind: torch.dtype, *shape: int) -> Tensor:
        return torch.zeros(batch_size, 0, *shape, dtype=kind, device=device)

    def counter() -> Tensor:
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    kv = {} if heads is None else {"keys": slots(dtype, *heads), "values": slots(dtype, *heads)}
    return {
        **kv,
        "positions": slots(torch.long),
        "valid": slots(torch.bool),
        "share": slots(dtype),
        "position": counter(),
        "evictions": counter(),
    }


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


def keep_by_share(valid: Tensor, share: Tensor, threshold: float, capacity: int | None) -> Tensor:
    """Slots that stay in a cache evicting by attention share: the live ones whose share is at
    least `threshold`, narrowed to `capacity` (None: no cap), the newest at threshold 0, else
    the highest share (ties: newest). `valid, share: [B, L]`, slots in age order, oldest first.
    """
    keep = keep_above_threshold(share, valid, threshold)
    if capacity is None:
        return keep
    if threshold == 0.0:
        return keep_newest(keep, capacity)
    return keep_largest(keep, share, capacity)


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


def next_cache(
    keep: Tensor,
    candidates: Tensor,
    slots: dict[str, Tensor],
    position: Tensor,
    evictions: Tensor,
) -> dict[str, Tensor]:
    """A slot cache's fields by name after a call: the candidate `slots` (each `[B, N, ...]`)
    narrowed to `keep: [B, N]` and compacted oldest first, their `valid` mask, `position` (the
    counter already advanced) and `evictions` raised by the live candidates (`candidates: [B,
    N]` bool) not kept."""
    compacted, valid = compact_slots(keep, list(slots.values()))
    return {
        **dict(zip(slots, compacted, strict=True)),
        "valid": valid,
        "position": position,
        "evictions": evictions + (candidates.sum(1) - keep.sum(1)),
    }


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


def live_then_chunk(
    cache: MemoryState, chunk: dict[str, Tensor], chunk_pos: Tensor
) -> tuple[dict[str, Tensor], list[int]]:
    """For one sequence of a reference path: the live entries of `cache` (a batch-1 slot cache
    with `valid`, `positions` and `share`) followed by the chunk's, whose `[T, ...]` tensors
    `chunk` holds under the cache's field names. Returns those fields and `share` (0 for the
    chunk's tokens), each `[N, ...]`, and the N positions as a list."""
    fields = cache.tensors()
    live = fields["valid"][0]
    entries = {name: torch.cat([fields[name][0][live], t]) for name, t in chunk.items()}
    share = fields["share"]
    entries["share"] = torch.cat([share[0][live], share.new_zeros(len(chunk_pos))])
    return entries, fields["positions"][0][live].tolist() + chunk_pos.tolist()


def reference_kept(
    positions: list[int], shares: list[float], threshold: float, capacity: int | None
) -> list[int]:
    """`keep_by_share` for one sequence, written out over lists: the indices of the entries at
    `positions` that stay, oldest first."""
    kept = [n for n in range(len(positions)) if threshold <= 0.0 or shares[n] >= threshold]
    if capacity is not None and len(kept) > capacity:
        if threshold <= 0.0:
            order = sorted(kept, key=lambda n: positions[n])
        else:
            order = sorted(kept, key=lambda n: (shares[n], positions[n]))
        kept = order[-capacity:]
    return sorted(kept, key=lambda n: positions[n])


def kept_rows(
    kept: list[int],
    entries: dict[str, Tensor],
    positions: list[int],
    position: Tensor,
    evictions: Tensor,
) -> dict[str, Tensor]:
    """`next_cache` for one sequence of a reference path: the `entries` (each `[N, ...]`, by
    field name) at the indices `kept`, their `positions` and an all-live mask, as a batch of one;
    the new `position` counter, and `evictions` raised by the entries not kept."""
    device = next(iter(entries.values())).device
    index = torch.tensor(kept, dtype=torch.long, device=device)
    kept_positions = torch.tensor([positions[n] for n in kept], dtype=torch.long, device=device)
    return {
        **{name: t[index][None] for name, t in entries.items()},
        "positions": kept_positions[None],
        "valid": torch.ones(1, len(kept), dtype=torch.bool, device=device),
        "position": position,
        "evictions": evictions + len(positions) - len(kept),
    }


def _pad_index(order: Tensor, length: int) -> Tensor:
    extra = order[:, :1].expand(-1, length - order.shape[1])
    return torch.cat([order, extra], dim=1)
