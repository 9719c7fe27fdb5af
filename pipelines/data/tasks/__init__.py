"""Synthetic memory tasks: one generator per `kind`, all `generate(config, num_examples, seed)`.

Each returns `inputs` and `labels` (int64 `[N, T]`, aligned: the model reads `inputs[:, t]` and
is scored on `labels[:, t]`, -100 where unscored) plus per-example metadata columns `[N]`. The
sequence-to-sequence tasks (`seq2seq_*`) add `context` (int64 `[N, Tc]`, 0-padded), which an
encoder-decoder model encodes into memory before the decoder reads `inputs` (tasks/seq2seq.py).
`generate` pads a mixture to its longest part; `generate_part` makes the rows of one part at
their own length, which is what the prepared data sets store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.data.config import SyntheticTask
from pipelines.data.tasks import (
    copy,
    forgetting_mqar,
    mqar,
    selective_copy,
    seq2seq_copy,
    seq2seq_mqar,
    seq2seq_recall,
)
from pipelines.data.tasks.common import Batch

GENERATORS: dict[str, Callable[[Any, int, int], Batch]] = {
    "mqar": mqar.generate,
    "forgetting_mqar": forgetting_mqar.generate,
    "copy": copy.generate,
    "selective_copy": selective_copy.generate,
    "seq2seq_mqar": seq2seq_mqar.generate,
    "seq2seq_copy": seq2seq_copy.generate,
    "seq2seq_reverse": seq2seq_copy.generate,
    "seq2seq_recall": seq2seq_recall.generate,
}
PART_GENERATORS: dict[str, Callable[[Any, Any, int, np.random.Generator], Batch]] = {
    "mqar": mqar.generate_part,
    "forgetting_mqar": forgetting_mqar.generate_part,
    "copy": copy.generate_part,
    "selective_copy": selective_copy.generate_part,
    "seq2seq_mqar": seq2seq_mqar.generate_part,
    "seq2seq_copy": seq2seq_copy.generate_part,
    "seq2seq_reverse": seq2seq_copy.generate_part,
    "seq2seq_recall": seq2seq_recall.generate_part,
}


def generate(config: SyntheticTask, num_examples: int, seed: int) -> Batch:
    """Dispatch on `config.kind` to the task's generator."""
    return GENERATORS[config.kind](config, num_examples, seed)


def generate_part(
    config: SyntheticTask, part: Any, num_examples: int, rng: np.random.Generator
) -> Batch:
    """Rows of one part of `config` (an entry of `config.part_list()`), unpadded."""
    return PART_GENERATORS[config.kind](config, part, num_examples, rng)
