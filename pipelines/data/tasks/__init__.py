"""Synthetic memory tasks: one generator per `kind`, all `generate(config, num_examples, seed)`.

Each returns `inputs` and `labels` (int64 `[N, T]`, aligned: the model reads `inputs[:, t]` and
is scored on `labels[:, t]`, -100 where unscored) plus per-example metadata columns `[N]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.data.config import SyntheticTask
from pipelines.data.tasks import copy, forgetting_mqar, mqar, selective_copy
from pipelines.data.tasks.common import Batch

GENERATORS: dict[str, Callable[[Any, int, int], Batch]] = {
    "mqar": mqar.generate,
    "forgetting_mqar": forgetting_mqar.generate,
    "copy": copy.generate,
    "selective_copy": selective_copy.generate,
}


def generate(config: SyntheticTask, num_examples: int, seed: int) -> Batch:
    """Dispatch on `config.kind` to the task's generator."""
    return GENERATORS[config.kind](config, num_examples, seed)
