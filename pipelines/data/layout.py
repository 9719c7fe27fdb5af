"""How prepared rows are stored: compact token rows at each part's own length, as Arrow.

A stored block (one Parquet file, one Ray Data block) holds rows of one or more parts, each part's
rows contiguous:

- token columns (`inputs`, `labels`, and a sequence-to-sequence task's `context`: every `[n, L]`
  column): one `binary` value per row holding its tokens as little-endian intN, N the
  smallest of 8/16/32 bits that holds the vocabulary and the ignore label -100 (int16 for
  Zoology's vocabulary 8,192; the field's metadata names the type), at the row's own length: no
  padding is stored or ever added. A binary value per row, not a `list<intN>`: Parquet then
  writes and reads one length per row instead of repetition levels per token, which measured
  3x faster to write and 2x faster to read (bench_data.py);
- `part`: int16, which part of the split the row belongs to (one length, one configuration);
- the task's metadata columns (`seq_len`, `num_kv_pairs`, ...) as int32; `row_hash` and the text
  `position` as int64.

`part_runs` turns a block back into numpy `[n, L]` arrays per run of one part without copying:
the rows' bytes are one contiguous buffer, so a run is a slice of it, viewed as intN and
reshaped. Tokens stay in their compact type until the training step moves them to the device and
widens them there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipelines.data.errors import DataError
from pipelines.data.tasks.common import IGNORE, Batch

PART = "part"
_DTYPE = b"dtype"
_WIDE_COLUMNS = {"row_hash", "position"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest signed integer type holding token ids [0, vocab_size) and -100."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= IGNORE and vocab_size - 1 <= info.max:
            return np.dtype(dtype)
    raise DataError(f"vocab_size={vocab_size} does not fit in int32 token ids; lower it")


def to_table(pieces: Sequence[Batch], parts: Sequence[int], dtype: np.dtype) -> pa.Table:
    """One Arrow table from per-part row batches (token columns `[n_i, L_i]`, metadata `[n_i]`),
    in order.

    Token values are cast to `dtype` (checked by `token_dtype`); metadata keep their names.
    """
    sizes = [len(piece["inputs"]) for piece in pieces]
    tokens = token_columns(pieces[0])
    fields = [
        pa.field(name, pa.binary(), metadata={_DTYPE: np.dtype(dtype).name}) for name in tokens
    ]
    arrays = [_token_rows([piece[name] for piece in pieces], dtype) for name in tokens]
    fields.append(pa.field(PART, pa.int16()))
    arrays.append(pa.array(np.repeat(np.asarray(parts, np.int16), sizes)))
    for name in pieces[0]:
        if name not in tokens:
            wide = np.int64 if name in _WIDE_COLUMNS else np.int32
            column = np.concatenate([piece[name] for piece in pieces]).astype(wide)
            fields.append(pa.field(name, pa.from_numpy_dtype(wide)))
            arrays.append(pa.array(column))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def token_columns(rows: Batch) -> tuple[str, ...]:
    """The names of the `[n, L]` token columns of a batch of rows."""
    return tuple(name for name, column in rows.items() if column.ndim == 2)


def _token_rows(blocks: Sequence[np.ndarray], dtype: np.dtype) -> pa.BinaryArray:
    """One binary value per row of `[n_i, L_i]` arrays: their little-endian intN bytes."""
    stored = np.dtype(dtype).newbyteorder("<")
    values = np.concatenate([block.astype(stored, copy=False).ravel() for block in blocks])
    widths = np.repeat([block.shape[1] for block in blocks], [len(block) for block in blocks])
    offsets = np.zeros(len(widths) + 1, dtype=np.int64)
    np.cumsum(widths * stored.itemsize, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise DataError("a stored block exceeds 2 GiB of tokens; lower the chunk size")
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values)]
    return pa.Array.from_buffers(pa.binary(), len(widths), buffers)


def part_runs(block: pa.Table | pa.RecordBatch) -> Iterator[tuple[int, Batch]]:
    """`(part, columns)` for each run of consecutive rows of one part: token columns as `[n, L]`
    views of the Arrow buffers (no copy), the others `[n]`."""
    for batch in block.to_batches() if isinstance(block, pa.Table) else [block]:
        part = batch.column(PART).to_numpy()
        if not len(part):
            continue
        starts = np.concatenate([[0], np.flatnonzero(np.diff(part)) + 1])
        ends = np.append(starts[1:], len(part))
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            yield int(part[start]), _run(batch, start, end)


def _run(batch: pa.RecordBatch, start: int, end: int) -> Batch:
    out: Batch = {}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_binary(field.type):  # token rows; `_token_view` reads their type
            out[field.name] = _token_view(field, column, start, end)
        elif field.name != PART:
            out[field.name] = column.slice(start, end - start).to_numpy()
    return out


def _token_view(field: pa.Field, column: pa.BinaryArray, start: int, end: int) -> np.ndarray:
    """Rows `start:end` of a token column as an `[n, L]` view of its bytes."""
    if not field.metadata or _DTYPE not in field.metadata:
        raise DataError(f"stored column {field.name!r} does not name its token type; rebuild")
    dtype = np.dtype(field.metadata[_DTYPE].decode()).newbyteorder("<")
    _, offsets, data = column.buffers()
    bounds = np.frombuffer(offsets, np.int32)[column.offset + start : column.offset + end + 1]
    width = (bounds[-1] - bounds[0]) // (end - start) // dtype.itemsize
    if not np.all(np.diff(bounds) == width * dtype.itemsize):
        raise DataError("a stored part mixes row lengths; delete the data cache to rebuild it")
    count = (bounds[-1] - bounds[0]) // dtype.itemsize
    return np.frombuffer(data, dtype, count=count, offset=bounds[0]).reshape(end - start, width)
