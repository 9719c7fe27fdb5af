"""The explicit memory state every mechanism carries between calls.

Conventions every state follows, so that one generic implementation of `detach`, `to`, `stack`,
`split` and `nbytes` serves all mechanisms:

* every field is a `torch.Tensor` whose dim 0 is the batch;
* a tensor indexed by memory slot (a KV cache entry, a memory row, a cached hidden state) keeps the
  slot at dim 1, and a boolean `valid`-style mask says which slots are live. Two states whose slot
  counts differ can still be stacked: `stack` pads dim 1 on the right with zeros (False for masks),
  which every mechanism treats as empty slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Self

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclasses.dataclass
class MemoryState:
    """Base class of all memory states: a dataclass of batch-first tensors."""

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map(self, fn) -> Self:
        return type(self)(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    def detach(self) -> Self:
        """Cut the autograd history (truncated backprop between segments)."""
        return self._map(Tensor.detach)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Self:
        """Move to a device; `dtype` applies to floating tensors only (not masks, counters)."""

        def move(t: Tensor) -> Tensor:
            target = dtype if dtype is not None and t.is_floating_point() else t.dtype
            return t.to(device=device, dtype=target)

        return self._map(move)

    def nbytes(self) -> int:
        """Bytes held by all tensors of the state, the whole batch."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def nbytes_per_sequence(self) -> int:
        return self.nbytes() // self.batch_size

    def live_entries(self) -> Tensor:
        """Number of live memory entries per sequence, `[B]` long. Never above `memory_size`."""
        raise NotImplementedError(f"{type(self).__name__} must define live_entries()")

    def metrics(self) -> dict[str, float]:
        """Scalars a trainer or server logs about the memory (batch means)."""
        return {"live_entries": self.live_entries().float().mean().item()}

    def _always_live(self, count: int) -> Tensor:
        """`[B]` long, `count` everywhere: the live entries of a fixed-size state, all of whose
        `count` entries are always in use."""
        device = next(iter(self.tensors().values())).device
        return torch.full((self.batch_size,), count, dtype=torch.long, device=device)

    @classmethod
    def stack(cls, states: Sequence[Self]) -> Self:
        """Concatenate states along the batch, padding differing slot counts (dim 1)."""
        if not states:
            raise ValueError("stack() needs at least one state")
        names = states[0].tensors().keys()
        return cls(**{name: _cat_padded([s.tensors()[name] for s in states]) for name in names})

    def split(self, sizes: int | Sequence[int] = 1) -> list[Self]:
        """Split along the batch: `sizes` is a chunk size or a list of sizes (torch.split)."""
        parts = {name: torch.split(t, sizes, dim=0) for name, t in self.tensors().items()}
        count = len(next(iter(parts.values())))
        return [type(self)(**{name: p[i] for name, p in parts.items()}) for i in range(count)]

    def select(self, index: Tensor) -> Self:
        """Rows of the batch given by `index` (a long tensor), e.g. to reset finished streams."""
        return self._map(lambda t: t.index_select(0, index))


@dataclasses.dataclass
class SlotCacheState(MemoryState):
    """A cache of slots whose live ones are marked by a bool `valid: [B, L]`, that counts the
    entries it dropped in `evictions: [B]` long and the tokens it has read in `position: [B]`
    long. Subclasses declare those fields with the rest."""

    def live_entries(self) -> Tensor:
        return self.valid.sum(1)

    def metrics(self) -> dict[str, float]:
        """Besides the live entries: evictions so far and per token read, so that a logged run
        shows at once whether its threshold or its bound did anything."""
        per_token = self.evictions.float() / self.position.clamp_min(1)
        return {
            **super().metrics(),
            "evictions": self.evictions.float().mean().item(),
            "evictions_per_token": per_token.mean().item(),
        }


def _cat_padded(tensors: list[Tensor]) -> Tensor:
    shapes = {t.shape[2:] for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"cannot stack states whose tensors differ beyond the slot dim: {shapes}")
    if tensors[0].dim() >= 2:
        slots = max(t.shape[1] for t in tensors)
        tensors = [_pad_slots(t, slots) for t in tensors]
    return torch.cat(tensors, dim=0)


def _pad_slots(t: Tensor, slots: int) -> Tensor:
    missing = slots - t.shape[1]
    if missing == 0:
        return t
    # F.pad counts dims from the last one: zero padding for all dims after the slot dim.
    padding = [0, 0] * (t.dim() - 2) + [0, missing]
    if t.dtype == torch.bool:
        return F.pad(t.to(torch.uint8), padding).to(torch.bool)
    return F.pad(t, padding)
