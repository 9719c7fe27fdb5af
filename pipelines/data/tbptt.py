"""Truncated backprop through time: cut a batch of long streams into consecutive segments.

Row i of segment k + 1 continues row i of segment k, so a recurrent or Transformer-XL model
carries its memory state from one segment to the next and resets it only where `reset` is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor; only slicing along dim 1 is used


@dataclass(frozen=True)
class Segment(Generic[Array]):
    """One TBPTT step: inputs/labels `[B, S]` (the last one may be shorter)."""

    index: int
    inputs: Array
    labels: Array | None
    reset: bool


def segments(
    batch_inputs: Array, segment_len: int, batch_labels: Array | None = None
) -> Iterator[Segment[Array]]:
    """Yield consecutive `[B, segment_len]` slices of `[B, T]` streams; `reset` on the first."""
    if segment_len < 1:
        raise ValueError(f"segment_len={segment_len} must be >= 1")
    total = batch_inputs.shape[1]  # type: ignore[attr-defined]
    for index, start in enumerate(range(0, total, segment_len)):
        stop = start + segment_len
        labels = None if batch_labels is None else batch_labels[:, start:stop]  # type: ignore[index]
        yield Segment(index, batch_inputs[:, start:stop], labels, reset=index == 0)  # type: ignore[index]
