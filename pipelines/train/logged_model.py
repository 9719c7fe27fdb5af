"""A trained model in MLflow, loadable where memlab is not installed.

One logged model, two ways in:

- `model/`: the `mlflow.pytorch` flavor (and its `python_function` view), `tokens [B, T] ->
  logits [B, T, vocab]` from empty memory for any T, with `memory_models` shipped in its `code/`
  folder, so `mlflow.pytorch.load_model` and `mlflow.pyfunc.load_model` need only the logged
  requirements (torch, numpy, pydantic, mlflow), not memlab.
- `checkpoint/`: the checkpoint folder (`pipelines.checkpoint`), from which memlab's server
  rebuilds the stateful model with `torch.load(weights_only=True)`.

The flavor's serialization is pickle, chosen on purpose: torch.export ("pt2") fixes the sequence
length of recurrent mechanisms to the example's and cannot trace data-dependent eviction. A pickle
runs code when it is loaded, so load only models you trust that way; memlab's server never
unpickles (it reads `checkpoint/`). MLflow's warning about pickle is therefore silenced here,
where the choice is made, and nowhere else.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import memory_models
from memory_models.model import LogitsOnly
from pipelines.checkpoint import load_model
from pipelines.experiment import ExperimentConfig

MODEL_URI_TAG = "memlab.model_uri"
CHECKPOINT_ARTIFACT = "checkpoint"
MEMORY_MODELS_CODE = str(Path(memory_models.__file__).parent)
REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    f"numpy=={np.__version__}",
    "pydantic>=2.7,<3",
    f"mlflow=={mlflow.__version__}",
]


def signature(vocab_size: int) -> ModelSignature:
    """Any batch of any length: int64 tokens `[-1, -1]` -> float32 logits `[-1, -1, vocab]`.

    Unnamed tensors: the PyTorch flavor takes one array, not a dict of named ones."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, vocab_size))]),
    )


def log_sequence_model(
    run_id: str,
    checkpoint_dir: Path,
    config: ExperimentConfig,
    extra_artifacts: list[Path] | None = None,
) -> str:
    """Log a checkpoint folder's model into MLflow run `run_id`; return the model URI.

    The input example is one row of the task's own width. The tracking URI must be set.
    """
    model, _ = load_model(checkpoint_dir)
    example = np.zeros((1, config.data.task.row_width), dtype=np.int64)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False), _pickle_chosen():
        info = mlflow.pytorch.log_model(
            LogitsOnly(model),
            name="model",
            serialization_format="pickle",
            code_paths=[MEMORY_MODELS_CODE],
            signature=signature(config.model.vocab_size),
            input_example=example,
            pip_requirements=REQUIREMENTS,
        )
        mlflow.log_artifacts(str(checkpoint_dir), artifact_path=CHECKPOINT_ARTIFACT)
        for path in extra_artifacts or []:
            mlflow.log_artifact(str(path))
    return info.model_uri


class _PickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "by Pickle or CloudPickle" not in record.getMessage()


@contextmanager
def _pickle_chosen():
    """Drop MLflow's warning about pickle serialization (the module docstring says why)."""
    logger = logging.getLogger("mlflow.pytorch")
    quiet = _PickleWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
