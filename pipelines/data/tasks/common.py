"""Vectorised sampling and batching shared by the task generators.

Every function draws a whole batch at once from a `numpy.random.Generator`; none loops over
examples, which is what makes generation fast enough to skip a download.

Exactness: a seed gives the same bytes on every CPU. Nothing here depends on an order that numpy
leaves unspecified (`argpartition`'s output order, an unstable sort's order among ties), and the
only floating-point values compared are products of numpy's Generator stream with weights
computed once in Python, so numpy's SIMD dispatch (`NPY_DISABLE_CPU_FEATURES`) changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache, partial
from typing import Any, Protocol, TypeVar

import numpy as np

from pipelines.data.errors import DataError

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
    """First k of a random permutation of range(size) per row, in chunks to bound memory.

    A stable sort: should two random keys tie, the lower index comes first on every CPU.
    """
    rows_per_chunk = max(1, _SORT_CHUNK_ELEMENTS // size)
    chunks = [
        np.argsort(rng.random((min(rows_per_chunk, n - start), size)), axis=1, stable=True)[:, :k]
        for start in range(0, n, rows_per_chunk)
    ]
    return np.concatenate(chunks, axis=0) if chunks else np.empty((0, k), dtype=np.int64)


def power_law_choice(
    rng: np.random.Generator, space: int, n: int, k: int, power_a: float
) -> np.ndarray:
    """`[n, k]` distinct positions in [0, space): column j is the j-th draw of sequential
    sampling without replacement with weights p(i) ~ (i + 1) ** (power_a - 1).

    This is the law of Zoology's query gaps (`zoology/data/multiquery_ar.py`: `np.random.choice`
    over `arange(space)` with `replace=False`, whose j-th output goes to the j-th key), so the
    first keys get the nearer queries on average.

    Method (Gumbel-top-k as an exponential race): give position i the key E_i = X_i / p(i) with
    X_i ~ Exp(1) i.i.d., so E_i ~ Exp(rate p(i)); equivalently the Gumbel score
    log p(i) - log X_i, whose descending order is E's ascending order. Take the k smallest keys
    in ascending order. Proof that this is sequential sampling: the minimum of independent
    exponentials is E_i with probability p(i) / sum(p), and by memorylessness the others' excess
    over it, E_l - min, are again independent Exp(p(l)), independent of which one won. So the
    second smallest is l with probability p(l) / (sum(p) - p(i)), and so on by induction: exactly
    the probabilities of drawing i, then l, ... one at a time without replacement.

    Order and ties are explicit: keys are sorted by (key, position) with stable sorts, and a row
    whose k-th and (k+1)-th keys tie (probability ~ 1e-16) is sorted whole, so the result never
    depends on `argpartition`'s unspecified order.
    """
    keys = rng.standard_exponential((n, space)) * _inverse_weights(space, power_a)
    rows = np.arange(n)[:, None]
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
    chosen.sort(axis=1)  # ascending position, so the stable sort below breaks ties by position
    chosen = chosen[rows, np.argsort(keys[rows, chosen], axis=1, stable=True)]
    tied = np.count_nonzero(keys <= keys[rows, chosen[:, -1:]], axis=1) != k
    if tied.any():
        chosen[tied] = np.argsort(keys[tied], axis=1, stable=True)[:, :k]
    return chosen.astype(np.int64, copy=False)


@lru_cache(maxsize=64)
def _inverse_weights(space: int, power_a: float) -> np.ndarray:
    """1 / p(i) up to a constant: (i + 1) ** (1 - power_a), in Python's `math.pow` (one call per
    position) rather than numpy's vectorised power, whose result can vary with the SIMD path."""
    exponent = 1.0 - power_a
    weights = np.array([math.pow(i + 1, exponent) for i in range(space)], dtype=np.float64)
    weights.setflags(write=False)
    return weights


def block_seed(seed: int, split: int, block: int) -> int:
    """Independent streams per (seed, split, block): test never replays a training stream."""
    state = np.random.SeedSequence([seed, split, block]).generate_state(2, dtype=np.uint64)
    return int(state[0])


def split_evenly(total: int, parts: int) -> list[int]:
    """Counts per part that sum to `total`, the first `total % parts` parts one larger."""
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Counts proportional to integer `weights` that sum to `total` (largest remainder; equal
    remainders go to the earlier part). Exact when `total` is the weights' sum."""
    whole = sum(weights)
    counts = [total * weight // whole for weight in weights]
    remainders = [total * weight % whole for weight in weights]
    short = total - sum(counts)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:short]:
        counts[index] += 1
    return counts


class MixtureTask(Protocol):
    """What `generate_mixture` asks of a task's settings (every synthetic task config has it)."""

    def check(self) -> None: ...
    def part_list(self) -> Sequence[Any]: ...
    def part_weights(self) -> Sequence[int]: ...


def row_width(config: Any) -> int:
    """The padded width of a decoder-only mixture: every `[N, T]` column to the longest row."""
    return config.row_width


def generate_mixture(
    config: MixtureTask,
    num_examples: int,
    seed: int,
    make_part: Callable[[Any, Any, int, np.random.Generator], Batch],
    widths: Callable[[Any], int | Mapping[str, int]] = row_width,
) -> Batch:
    """A task's `generate`: check the settings, then `num_examples` rows of the mixture of
    `config.part_list()` (rows apportioned by `config.part_weights()`), each part made by
    `make_part(config, part, n, rng)` from one stream seeded by `seed`, padded to
    `widths(config)` (see `mixture`) and shuffled. `widths` runs after the check, so a bad
    setting is reported as a `DataError`."""
    config.check()
    if num_examples < 0:
        raise DataError(f"num_examples={num_examples} must be >= 0")
    rng = np.random.default_rng(seed)
    return mixture(
        config.part_list(),
        config.part_weights(),
        num_examples,
        rng,
        partial(make_part, config),
        widths(config),
    )


def mixture(
    parts: Sequence[Part],
    weights: Sequence[int],
    num_examples: int,
    rng: np.random.Generator,
    make_part: Callable[[Part, int, np.random.Generator], Batch],
    width: int | Mapping[str, int],
) -> Batch:
    """Generate every part of a length mixture (rows apportioned by `weights`), pad rows to
    `width`, and shuffle the rows.

    `width` is one width for every `[N, T]` column, or a width per column name (a sequence-to-
    sequence task's `context` and decoder `inputs` differ). Padding: labels with `IGNORE` (-100),
    so padded positions are never scored, the others with `PAD` (0); a model sees trailing zeros
    after a short example, which carry no information.
    The prepared Ray data sets are not padded: they keep each part at its own length.
    """
    counts = apportion(num_examples, weights)
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
