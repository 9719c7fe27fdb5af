"""Vectorised sampling and batching shared by the task generators.

Every function draws a whole batch at once from a `numpy.random.Generator`; none loops over
examples, which is what makes generation fast enough to skip a download.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

IGNORE = -100
PAD = 0
Batch = dict[str, np.ndarray]
Part = TypeVar("Part")

# Rejection sampling redraws only the rows that hold a duplicate; after this many rounds the few
# rows left over are drawn by sorting random keys, which always succeeds.
_REJECTION_ROUNDS = 32
_SORT_CHUNK_ELEMENTS = 1 << 22


def distinct_choice(rng: np.random.Generator, low: int, high: int, n: int, k: int) -> np.ndarray:
    """`[n, k]` integers from [low, high), distinct within each row, in uniformly random order.

    Same distribution as `rng.choice(range(low, high), k, replace=False)` per row.
    """
    size = high - low
    out = np.empty((n, k), dtype=np.int64)
    todo = np.arange(n)
    # Duplicates are rare while k * k is small next to the range: redraw only the bad rows.
    rounds = _REJECTION_ROUNDS if k * k <= 2 * size else 0
    for _ in range(rounds):
        if todo.size == 0:
            break
        out[todo] = rng.integers(low, high, size=(todo.size, k))
        todo = todo[_has_duplicates(out[todo])]
    if todo.size:
        out[todo] = low + _sorted_prefix(rng, todo.size, size, k)
    return out


def _has_duplicates(rows: np.ndarray) -> np.ndarray:
    ordered = np.sort(rows, axis=1)
    return (np.diff(ordered, axis=1) == 0).any(axis=1)


def _sorted_prefix(rng: np.random.Generator, n: int, size: int, k: int) -> np.ndarray:
    """First k of a random permutation of range(size) per row, in chunks to bound memory."""
    rows_per_chunk = max(1, _SORT_CHUNK_ELEMENTS // size)
    chunks = [
        np.argsort(rng.random((min(rows_per_chunk, n - start), size)), axis=1)[:, :k]
        for start in range(0, n, rows_per_chunk)
    ]
    return np.concatenate(chunks, axis=0) if chunks else np.empty((0, k), dtype=np.int64)


def power_law_choice(
    rng: np.random.Generator, space: int, n: int, k: int, power_a: float
) -> np.ndarray:
    """`[n, k]` distinct positions in [0, space), drawn without replacement with weights
    p(i) ~ (i + 1) ** (power_a - 1): Zoology's query gaps, so near gaps are favoured.

    Gumbel top-k gives the same law as sequential weighted sampling without replacement.
    """
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
    scores = log_p + rng.gumbel(size=(n, space))
    return np.argpartition(-scores, k - 1, axis=1)[:, :k].astype(np.int64)


def block_seed(seed: int, split: int, block: int) -> int:
    """Independent streams per (seed, split, block): test never replays a training stream."""
    state = np.random.SeedSequence([seed, split, block]).generate_state(2, dtype=np.uint64)
    return int(state[0])


def split_evenly(total: int, parts: int) -> list[int]:
    """Counts per part that sum to `total`, the first `total % parts` parts one larger."""
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]


def mixture(
    parts: Sequence[Part],
    num_examples: int,
    rng: np.random.Generator,
    make_part: Callable[[Part, int, np.random.Generator], Batch],
    width: int | Mapping[str, int],
) -> Batch:
    """Generate every part of a length mixture, pad rows to `width`, and shuffle the rows.

    `width` is one width for every `[N, T]` column, or a width per column name (a sequence-to-
    sequence task's `context` and decoder `inputs` differ). Padding: labels with `IGNORE` (-100),
    so padded positions are never scored, the others with `PAD` (0); a model sees trailing zeros
    after a short example, which carry no information.
    """
    counts = split_evenly(num_examples, len(parts))
    pieces = [make_part(part, count, rng) for part, count in zip(parts, counts, strict=True)]
    widths = width if isinstance(width, Mapping) else {name: width for name in pieces[0]}
    batch = {
        name: _stack(name, [piece[name] for piece in pieces], widths.get(name))
        for name in pieces[0]
    }
    order = rng.permutation(num_examples)
    return {name: column[order] for name, column in batch.items()}


def _stack(name: str, columns: list[np.ndarray], width: int | None) -> np.ndarray:
    if columns[0].ndim == 1:
        return np.concatenate(columns)
    if width is None:
        raise ValueError(f"mixture: no padded width given for column {name!r}")
    fill = IGNORE if name == "labels" else PAD
    return np.concatenate([_pad(column, width, fill) for column in columns], axis=0)


def _pad(rows: np.ndarray, width: int, fill: int) -> np.ndarray:
    out = np.full((rows.shape[0], width), fill, dtype=np.int64)
    out[:, : rows.shape[1]] = rows
    return out


def row_hashes(batch: Batch) -> np.ndarray:
    """A 64-bit fingerprint per row (int64 `[N]`), the same whatever the padded width.

    Position weights come from splitmix64 of the position, and padding (input 0, target -100)
    contributes nothing, so an example padded to 128 and to 256 hashes alike; `seq_len` tells
    trailing zero tokens from padding. Used to drop test rows that also occur in training.
    A sequence-to-sequence row's `context` (padded with 0 too) counts with weights of its own.
    """
    inputs, labels = batch["inputs"], batch["labels"]
    positions = np.arange(inputs.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        total = inputs.astype(np.uint64) @ _splitmix64(2 * positions)
        total += (labels - IGNORE).astype(np.uint64) @ _splitmix64(2 * positions + 1)
        total += batch["seq_len"].astype(np.uint64) * _splitmix64(np.array([2**62], np.uint64))
        if "context" in batch:
            context = batch["context"]
            slots = np.arange(context.shape[1], dtype=np.uint64) + np.uint64(2**61)
            total += context.astype(np.uint64) @ _splitmix64(slots)
    return _splitmix64(total).view(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
