"""Zoology's MQAR protocols as named data presets, read from Zoology's own configs.

- `zoology-mqar`: the MQAR data of Zoology's repository sweep
  `zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py` (the same data as
  `zoology/experiments/mqar_example_configs/original_mqar_configs.py`, which draws the MQAR plot
  in Zoology's README): one training mixture of five (seq_len, num_kv_pairs) configurations with
  their own example counts, and seven separate test configurations with more pairs and longer
  sequences (up to 1,024 tokens, 256 pairs), vocabulary 8,192, Zoology's `MQARConfig` defaults
  (`power_a=0.01`, `random_non_queries=True`).
- `zoology-iclr24-64` / `-128` / `-256`: Zoology's ICLR'24 figure 2
  (`zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`), which trains one model
  per setting (64, 4), (128, 8), (256, 16) on 100,000 rows and tests on 3,000 rows of the same
  setting, with `random_non_queries=False`.

Training settings of those sweeps (not data, so not in the presets; for recipes and reports):
`ZOOLOGY_MQAR_TRAINING` and `ZOOLOGY_ICLR24_TRAINING`.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from pipelines.data.config import (
    ICLR24_FIGURE2_SETTINGS,
    ZOOLOGY_VOCAB,
    DataConfig,
    MQARTask,
    RecallPart,
    Strict,
)

# zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py, `train_configs`:
# MQARConfig(input_seq_len, num_examples, num_kv_pairs) -> (seq_len, num_kv_pairs, weight).
ZOOLOGY_MQAR_TRAIN = (
    RecallPart(seq_len=64, num_kv_pairs=4, weight=100_000),
    RecallPart(seq_len=128, num_kv_pairs=8, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=16, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=32, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=64, weight=20_000),
)
# The same file, `test_configs`: 1,000 examples each.
ZOOLOGY_MQAR_TEST = (
    RecallPart(seq_len=64, num_kv_pairs=4, weight=1_000),
    RecallPart(seq_len=64, num_kv_pairs=8, weight=1_000),
    RecallPart(seq_len=64, num_kv_pairs=16, weight=1_000),
    RecallPart(seq_len=128, num_kv_pairs=32, weight=1_000),
    RecallPart(seq_len=256, num_kv_pairs=64, weight=1_000),
    RecallPart(seq_len=512, num_kv_pairs=128, weight=1_000),
    RecallPart(seq_len=1024, num_kv_pairs=256, weight=1_000),
)


class TrainingProtocol(Strict):
    """The optimisation settings a Zoology sweep pairs with its data."""

    source: str
    batch_size: int
    eval_batch_size: int
    learning_rates: tuple[float, ...]
    epochs: int
    d_models: tuple[int, ...]
    n_layers: int = 2
    batch_size_by_seq_len: dict[int, int] = Field(default_factory=dict)


def _logspace(low: float, high: float, count: int) -> tuple[float, ...]:
    """`np.logspace(low, high, count)` as Zoology writes its learning-rate grids."""
    return tuple(10 ** (low + (high - low) * i / (count - 1)) for i in range(count))


# batch_size=(256, 256 / 8); lr np.logspace(-3, -1.5, 4); max_epochs=32; attention d_model 64, 128.
ZOOLOGY_MQAR_TRAINING = TrainingProtocol(
    source="zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py",
    batch_size=256,
    eval_batch_size=32,
    learning_rates=_logspace(-3, -1.5, 4),
    epochs=32,
    d_models=(64, 128),
)
# Batch 512, but 256 / 128 / 64 at seq_len 256 / 512 / 1024; lr np.logspace(-4, -2, 4); 64 epochs.
ZOOLOGY_ICLR24_TRAINING = TrainingProtocol(
    source="zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py",
    batch_size=512,
    batch_size_by_seq_len={256: 256, 512: 128, 1024: 64},
    eval_batch_size=512,
    learning_rates=_logspace(-4, -2, 4),
    epochs=64,
    d_models=(64, 128, 256, 512),
)


def zoology_mqar() -> DataConfig:
    """Zoology's MQAR mixture: 180,000 training rows in five parts, 7,000 test rows in seven."""
    task = MQARTask(
        vocab_size=ZOOLOGY_VOCAB, parts=ZOOLOGY_MQAR_TRAIN, test_parts=ZOOLOGY_MQAR_TEST
    )
    return DataConfig(
        task=task,
        num_train_examples=sum(part.weight for part in ZOOLOGY_MQAR_TRAIN),
        num_test_examples=sum(part.weight for part in ZOOLOGY_MQAR_TEST),
    )


def zoology_iclr24(seq_len: int) -> DataConfig:
    """One setting of Zoology's ICLR'24 figure 2: train and test on that (seq_len, pairs)."""
    settings = {part.seq_len: part for part in ICLR24_FIGURE2_SETTINGS}
    if seq_len not in settings:
        raise ValueError(f"seq_len={seq_len} is not a figure-2 setting; pick one of {[*settings]}")
    task = MQARTask(vocab_size=ZOOLOGY_VOCAB, random_non_queries=False, parts=(settings[seq_len],))
    return DataConfig(task=task, num_train_examples=100_000, num_test_examples=3_000)


PRESETS: dict[str, Callable[[], DataConfig]] = {
    "zoology-mqar": zoology_mqar,
    "zoology-iclr24-64": lambda: zoology_iclr24(64),
    "zoology-iclr24-128": lambda: zoology_iclr24(128),
    "zoology-iclr24-256": lambda: zoology_iclr24(256),
}
