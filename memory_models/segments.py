"""Segment recurrence that does not depend on how a stream is cut into calls.

Transformer-XL and the Compressive Transformer are segment-recurrent: tokens of one segment
attend to each other and to a memory written when the previous segment closed. With segments
aligned to absolute positions 0, S, 2S, ..., and the open segment's layer inputs kept in the
state, a call that ends inside a segment answers for its tokens and keeps their inputs; the next
call re-reads them with the same memory, so outputs and state equal one whole pass whatever the
cut. The state's `position` counts every token seen; `position % S` of them are open.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from memory_models.state import MemoryState

State = TypeVar("State", bound=MemoryState)
#: One segment (or the open part of one) read from the memory at its start: `(x, state, closes)`
#: -> outputs and, when `closes`, the state after the segment (its open inputs are set here).
SegmentCall = Callable[[Tensor, State, bool], tuple[Tensor, State | None]]


def in_segments(
    call: SegmentCall, x: Tensor, state: State, segment_len: int
) -> tuple[Tensor, State]:
    """`x: [B, T, D]` -> `y: [B, T, D]` and the next state, reading whole aligned segments.

    The state must have `position: [B]` and `open_inputs: [B, P, D]`. Rows whose open segments
    differ in length (sessions stacked by a server) are read in groups of equal length."""
    opened = state.position % segment_len  # [B]
    if bool((opened == opened[0]).all()):
        return _aligned(call, x, state, int(opened[0]), segment_len)
    outputs, states, order = [], [], []
    for count in opened.unique().tolist():
        rows = (opened == count).nonzero().flatten()
        y, part = _aligned(call, x[rows], state.select(rows), count, segment_len)
        outputs.append(y)
        states.append(part)
        order.append(rows)
    back = torch.cat(order).argsort()
    return torch.cat(outputs)[back], type(state).stack(states).select(back)


def _aligned(
    call: SegmentCall, x: Tensor, state: State, opened: int, segment_len: int
) -> tuple[Tensor, State]:
    """Every row has `opened` open tokens: re-read them with `x`, one segment per call."""
    inputs = torch.cat([state.open_inputs[:, :opened], x], dim=1)  # [B, opened + T, D]
    boundary = dataclasses.replace(state, position=state.position - opened)
    outputs = []
    for start in range(0, inputs.shape[1], segment_len):
        piece = inputs[:, start : start + segment_len]
        closes = piece.shape[1] == segment_len
        y, after = call(piece, boundary, closes)
        outputs.append(y)
        if closes:
            boundary = dataclasses.replace(after, open_inputs=inputs[:, :0].detach())
        else:
            boundary = dataclasses.replace(
                boundary, position=boundary.position + piece.shape[1], open_inputs=piece
            )
    if not outputs:
        return x.new_zeros(x.shape), state
    return torch.cat(outputs, dim=1)[:, opened:], boundary


def open_bytes(seq_len: int, segment_len: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes per sequence of the open segment's inputs after `seq_len` tokens."""
    return (seq_len % segment_len) * d_model * (torch.finfo(dtype).bits // 8)
