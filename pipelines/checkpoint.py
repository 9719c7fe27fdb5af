"""The checkpoint format, with no Ray in it: what training writes and serving and MLflow read.

A checkpoint is a folder with two files:

- `experiment.json`: the whole `ExperimentConfig`, from which the model is rebuilt;
- `training_state.pt`: tensors and plain values only (model, optimizer and scheduler state dicts,
  and where training stands), read with `torch.load(weights_only=True)`, so loading a downloaded
  checkpoint cannot run code.

Ray Train carries these folders between workers and storage; nothing here needs Ray, so a server
or a script loads a model with torch alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memory_models.model import SequenceModel
from pipelines.experiment import ExperimentConfig

CHECKPOINT_FILE = "training_state.pt"
CONFIG_FILE = "experiment.json"


@dataclass
class Position:
    """Where training stands; stored in every checkpoint so a resumed run continues here."""

    epoch: int = 0
    batches_done: int = 0  # in the current epoch
    global_step: int = 0
    best_accuracy: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # Wall time in the batch loop (waiting for batches, the steps, step logging; not evaluation
    # or checkpoints): what benchmarks/bench_train.py compares with the plain loop.
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of the worker process over the same spans
    # The capacity controller's state (`CapacityController.state()`), its current memory size
    # included: a resumed run continues at that size.
    capacity: dict | None = None


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    config: ExperimentConfig,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": asdict(position),
        },
        folder / CHECKPOINT_FILE,
    )
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))


def is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / CHECKPOINT_FILE).is_file()


def read_config(folder: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate_json((folder / CONFIG_FILE).read_text())


def _training_state(folder: Path) -> dict:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def restore_training(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Position:
    """Load a checkpoint's weights, optimizer and scheduler in place; where training stood."""
    saved = _training_state(folder)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return Position(**saved["position"])


def read_position(folder: Path) -> Position:
    """Where a checkpoint's training stood, without building anything."""
    return Position(**_training_state(folder)["position"])


def load_model(folder: Path) -> tuple[SequenceModel, ExperimentConfig]:
    """The trained model, rebuilt from the checkpoint's own config, in eval mode."""
    if not is_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a memlab checkpoint: it needs {CONFIG_FILE} and {CHECKPOINT_FILE}"
        )
    config = read_config(folder)
    model = config.model.build()
    model.load_state_dict(_training_state(folder)["model"])
    return model.eval(), config
