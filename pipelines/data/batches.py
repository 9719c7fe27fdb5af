"""Batches for training, as torch tensors: from prepared Ray data, or fresh from a generator.

`shard_batches` reads a prepared split from Ray Data (`ray.train.get_dataset_shard`) block by
block and forms batches of rows of ONE part, so one length, as Zoology's loader does
(`zoology/data/utils.py`, `_SyntheticDataset`: a batch never spans two data segments): no padding
is added, and the mean loss of a batch is not re-weighted by padded positions. Per block it keeps
a row buffer per part, shuffles it, cuts full batches and emits them in a random order over
parts, so batches of all lengths interleave through the epoch; the rest waits for the part's
next block.

Under DDP every rank must train on the same part at every step: a part's length decides how many
truncated-backprop segments, so how many gradient all-reduces, a step takes. So the train split is
not sharded; every rank reads all of it in the same block order, forms the same global batches of
`batch_size * world` rows with the same seed, and keeps its own slice of each, as PyTorch's
`DistributedSampler` does. Every rank then takes exactly `batches_per_epoch` steps. Reading the
whole split is cheap here: the blocks sit in the shared object store and are viewed, not copied.

`task_batches` draws fresh batches straight from a task's generator: no Ray, no cache. For
scripts, tests and benchmarks that train in plain PyTorch (the README's library example):

    for batch in task_batches(task, batch_size=64, steps=200, seed=0):
        train_batch(model, batch, optimizer)

Each step draws one part (by weight) and a batch of it from its own seed stream
(`block_seed(seed, split, step)`), so a run is reproducible and two splits never share rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.config import SyntheticTask, TaskConfig, TextTask
from pipelines.data.errors import DataError
from pipelines.data.layout import part_runs
from pipelines.data.tasks import generate_part
from pipelines.data.tasks.common import Batch, apportion, block_seed

TRAIN, TEST = 0, 1
TorchBatch = dict[str, torch.Tensor]


class BlockSource(Protocol):
    """What `shard_batches` reads: a Ray `DataIterator` (a Train shard) or a `Dataset`."""

    def iter_batches(self, **kwargs: Any) -> Iterable[Any]: ...


def shard_batches(
    shard: BlockSource,
    batch_size: int,
    *,
    seed: int,
    drop_last: bool,
    world: int = 1,
    rank: int = 0,
    prefetch_blocks: int = 1,
) -> Iterator[TorchBatch]:
    """Batches of `batch_size` rows of one part each from a prepared split: this rank's slice
    of global batches of `batch_size * world` rows (every rank must read the same split).

    Tokens keep their stored type (int8/16/32; `to_device` widens them on the device).
    `drop_last`: drop each part's last partial batch (training); else yield it (evaluation).
    """
    blocks = shard.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_blocks
    )
    batches = part_batches(
        blocks, batch_size, seed=seed, drop_last=drop_last, world=world, rank=rank
    )
    for batch in batches:
        yield {name: torch.from_numpy(column) for name, column in batch.items()}


def part_batches(
    blocks: Iterable[pa.Table | pa.RecordBatch],
    batch_size: int,
    *,
    seed: int,
    drop_last: bool,
    world: int = 1,
    rank: int = 0,
) -> Iterator[Batch]:
    """The numpy core of `shard_batches`: blocks in, this rank's batches of one part out."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world:
        raise DataError(f"rank={rank} must be in [0, world={world})")
    rng = np.random.default_rng(seed)
    waiting: dict[int, Batch] = {}
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    for block in blocks:
        for part, rows in part_runs(block):
            waiting[part] = _concat(waiting[part], rows) if part in waiting else rows
        yield from _full_batches(waiting, batch_size * world, mine, rng)
    if not drop_last:
        for part in sorted(waiting):
            rows = _take(waiting[part], rng.permutation(_rows(waiting[part])))
            yield {name: column[rank::world] for name, column in rows.items()}


def _full_batches(
    waiting: dict[int, Batch], size: int, mine: slice, rng: np.random.Generator
) -> Iterator[Batch]:
    """This rank's slice of every full global batch of `size` rows the buffers hold, parts in
    random order; remainders stay waiting."""
    orders = {part: rng.permutation(_rows(rows)) for part, rows in waiting.items()}
    plan = np.array([part for part, order in orders.items() for _ in range(len(order) // size)])
    rng.shuffle(plan)
    cursor = dict.fromkeys(orders, 0)
    for part in plan.tolist():
        start = cursor[part]
        cursor[part] += size
        yield _take(waiting[part], orders[part][start : start + size][mine])
    for part, order in orders.items():
        rest = order[cursor[part] :]
        if len(rest):
            waiting[part] = _take(waiting[part], rest)
        else:
            del waiting[part]


def _rows(batch: Batch) -> int:
    return len(batch["inputs"])


def _take(batch: Batch, index: np.ndarray) -> Batch:
    return {name: column[index] for name, column in batch.items()}


def _concat(first: Batch, second: Batch) -> Batch:
    return {name: np.concatenate([first[name], second[name]]) for name in first}


def batches_per_epoch(task: TaskConfig, train_rows: int, batch_size: int, world: int) -> int:
    """Steps every rank takes per epoch of `shard_batches(..., drop_last=True)`: the full
    global batches of each part of the training split."""
    if isinstance(task, TextTask):
        part_rows = [train_rows]
    else:
        part_rows = apportion(train_rows, task.part_weights())
    return sum(rows // (batch_size * world) for rows in part_rows)


def task_batches(
    task: SyntheticTask,
    batch_size: int,
    steps: int | None = None,
    seed: int = 0,
    split: int = TRAIN,
) -> Iterator[TorchBatch]:
    """`steps` batches (None: without end) of `batch_size` rows of one part: `inputs`,
    `labels` ([B, T] int64, T the part's length) and the task's metadata columns ([B])."""
    if getattr(task, "kind", None) == "text":
        raise DataError("task_batches draws synthetic tasks; text comes from a corpus (prep)")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    task.check()
    parts, weights = task.part_list(), np.asarray(task.part_weights(), dtype=np.float64)
    step = 0
    while steps is None or step < steps:
        rng = np.random.default_rng(block_seed(seed, split, step))
        part = parts[int(rng.choice(len(parts), p=weights / weights.sum()))]
        rows = generate_part(task, part, batch_size, rng)
        yield {name: torch.from_numpy(column) for name, column in rows.items()}
        step += 1
