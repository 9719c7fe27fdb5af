"""Fresh batches straight from a task's generator, as torch tensors: no Ray, no cache.

For scripts, tests and benchmarks that train in plain PyTorch (the README's library example):

    for batch in task_batches(task, batch_size=64, steps=200, seed=0):
        train_batch(model, batch, optimizer)

Each step draws a new batch from its own seed stream (`block_seed(seed, split, step)`, the stream
the Ray Data path uses for its blocks), so a run is reproducible and two splits never share rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.data.config import SyntheticTask
from pipelines.data.errors import DataError
from pipelines.data.tasks import generate
from pipelines.data.tasks.common import block_seed

TRAIN, TEST = 0, 1


def task_batches(
    task: SyntheticTask,
    batch_size: int,
    steps: int | None = None,
    seed: int = 0,
    split: int = TRAIN,
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches (None: without end) of `batch_size` rows: `inputs`, `labels` ([B, T]
    int64) and the task's metadata columns ([B])."""
    if getattr(task, "kind", None) == "text":
        raise DataError("task_batches draws synthetic tasks; text comes from a corpus (prep)")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    step = 0
    while steps is None or step < steps:
        rows = generate(task, batch_size, block_seed(seed, split, step))
        yield {name: torch.from_numpy(column) for name, column in rows.items()}
        step += 1
