"""Zoology's MQAR protocols: the data presets (in `config.py`, `PRESETS`) and the training
settings Zoology's sweeps pair with them, read from Zoology's configs, for recipes and reports.

- `zoology-mqar` data, `ZOOLOGY_MQAR_TRAINING`:
  zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py;
- `zoology-iclr24-*` data, `ZOOLOGY_ICLR24_TRAINING`:
  zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.data.config import PRESETS, Strict, zoology_iclr24, zoology_mqar

__all__ = [
    "PRESETS",
    "ZOOLOGY_ICLR24_TRAINING",
    "ZOOLOGY_MQAR_TRAINING",
    "TrainingProtocol",
    "zoology_iclr24",
    "zoology_mqar",
]


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
