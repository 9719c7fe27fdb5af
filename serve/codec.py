"""A session's memory as bytes, for the shared store, and back.

The format is a JSON header (tokens read; per tensor its name, dtype and shape) followed by the
tensors' raw bytes: no pickle, so reading a blob runs no code, and it takes microseconds, which
matters because every session request decodes one and encodes one. The state classes come from the
served model itself, the only reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memory_models.architectures import TokenModel

LOGITS = "next_logits"
_LENGTH_BYTES = 8


@dataclass(frozen=True)
class SessionMemory:
    """One session: its model state (batch 1) and the logits for the token after its last one
    (`None` until it has read something)."""

    state: Any  # ModelState, or EncoderDecoderState: batch-first tensors behind `tensors()`
    next_logits: Tensor | None  # [vocab]
    tokens_seen: int


def encode(memory: SessionMemory) -> bytes:
    tensors = dict(memory.state.tensors())
    if memory.next_logits is not None:
        tensors[LOGITS] = memory.next_logits
    # `contiguous` + raw bytes: a state split out of a batch is a view of the whole batch.
    raw = [
        t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for t in tensors.values()
    ]
    entries = [[key, str(t.dtype), list(t.shape)] for key, t in tensors.items()]
    header = json.dumps({"tokens_seen": memory.tokens_seen, "tensors": entries}).encode()
    return len(header).to_bytes(_LENGTH_BYTES, "little") + header + b"".join(raw)


def decode(blob: bytes, model: TokenModel) -> SessionMemory:
    size = int.from_bytes(blob[:_LENGTH_BYTES], "little")
    header = json.loads(blob[_LENGTH_BYTES : _LENGTH_BYTES + size])
    buffer = bytearray(blob[_LENGTH_BYTES + size :])  # writable: torch.frombuffer wants one
    tensors, offset = {}, 0
    for key, dtype_name, shape in header["tensors"]:
        dtype = _dtype(dtype_name)
        count = _numel(shape) * dtype.itemsize
        tensors[key] = _tensor(buffer, offset, count, dtype, shape)
        offset += count
    logits = tensors.pop(LOGITS, None)
    return SessionMemory(model.state_from_tensors(tensors), logits, int(header["tokens_seen"]))


def empty(model: TokenModel) -> SessionMemory:
    return SessionMemory(model.init_state(1), None, 0)


def _tensor(buffer: bytearray, offset: int, count: int, dtype: torch.dtype, shape) -> Tensor:
    if count == 0:  # an empty memory (no slots yet): frombuffer refuses zero bytes
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
    return raw.view(dtype).reshape(shape)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype in a session blob: {name!r}")
    return dtype


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
