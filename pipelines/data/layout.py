"""How prepared rows are stored: compact token lists at each part's own length, as Arrow.

A stored block (one Parquet file, one Ray Data block) holds rows of one or more parts, each part's
rows contiguous:

- `inputs`, `labels`: `list<intN>` per row, N the smallest of 8/16/32 bits that holds the
  vocabulary and the ignore label -100 (int16 for Zoology's vocabulary 8,192), at the row's own
  length: no padding is stored or ever added;
- `part`: int16, which part of the split the row belongs to (one length, one configuration);
- the task's metadata columns (`seq_len`, `num_kv_pairs`, ...) as int32; `row_hash` and the text
  `position` as int64.

`part_runs` turns a block back into numpy `[n, L]` arrays per run of one part without copying:
the list values are one contiguous buffer, so a run is a slice of it, reshaped. Tokens stay in
their compact type until the training step moves them to the device and widens them there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipelines.data.errors import DataError
from pipelines.data.tasks.common import IGNORE, Batch

TOKEN_COLUMNS = ("inputs", "labels")
PART = "part"
_WIDE_COLUMNS = {"row_hash", "position"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest signed integer type holding token ids [0, vocab_size) and -100."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= IGNORE and vocab_size - 1 <= info.max:
            return np.dtype(dtype)
    raise DataError(f"vocab_size={vocab_size} does not fit in int32 token ids; lower it")


def to_table(pieces: Sequence[Batch], parts: Sequence[int], dtype: np.dtype) -> pa.Table:
    """One Arrow table from per-part row batches (`inputs`/`labels` `[n_i, L_i]`), in order.

    Token values are cast to `dtype` (checked by `token_dtype`); metadata keep their names.
    """
    sizes = [len(piece["inputs"]) for piece in pieces]
    columns: dict[str, pa.Array] = {
        name: _token_lists([piece[name] for piece in pieces], dtype) for name in TOKEN_COLUMNS
    }
    columns[PART] = pa.array(np.repeat(np.asarray(parts, np.int16), sizes))
    for name in pieces[0]:
        if name not in TOKEN_COLUMNS:
            wide = np.int64 if name in _WIDE_COLUMNS else np.int32
            columns[name] = pa.array(np.concatenate([piece[name] for piece in pieces]).astype(wide))
    return pa.table(columns)


def _token_lists(blocks: Sequence[np.ndarray], dtype: np.dtype) -> pa.ListArray:
    """`list<dtype>` rows from `[n_i, L_i]` arrays: one values buffer, offsets every L_i."""
    values = np.concatenate([block.astype(dtype, copy=False).ravel() for block in blocks])
    lengths = np.repeat([block.shape[1] for block in blocks], [len(block) for block in blocks])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise DataError("a stored block exceeds 2**31 tokens; lower the chunk size")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def part_runs(block: pa.Table | pa.RecordBatch) -> Iterator[tuple[int, Batch]]:
    """`(part, columns)` for each run of consecutive rows of one part: token columns as `[n, L]`
    views of the Arrow buffers (no copy), the others `[n]`."""
    for batch in block.to_batches() if isinstance(block, pa.Table) else [block]:
        part = batch.column(PART).to_numpy()
        starts = np.concatenate([[0], np.flatnonzero(np.diff(part)) + 1])
        ends = np.append(starts[1:], len(part))
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            yield int(part[start]), _run(batch, start, end)


def _run(batch: pa.RecordBatch, start: int, end: int) -> Batch:
    out: Batch = {}
    for name in batch.schema.names:
        column = batch.column(name)
        if name in TOKEN_COLUMNS:
            out[name] = _token_rows(column, start, end)
        elif name != PART:
            out[name] = column.slice(start, end - start).to_numpy()
    return out


def _token_rows(column: pa.ListArray, start: int, end: int) -> np.ndarray:
    offsets = column.offsets.to_numpy()[start : end + 1]
    width = (offsets[-1] - offsets[0]) // (end - start)
    if not np.all(np.diff(offsets) == width):
        raise DataError("a stored part mixes row lengths; delete the data cache to rebuild it")
    values = column.values.to_numpy()[offsets[0] : offsets[-1]]
    return values.reshape(end - start, width)
