"""Put a quickly trained model into the MLflow registry without Ray Train.

Tests, the serving benchmark and a first look at `memlab serve` need a registered champion in
seconds, not a sweep. This trains a recipe's model for a few steps with the plain loop, writes the
same checkpoint folder a Train worker writes, and logs it through the driver's own
`log_sequence_model`, so the server loads it exactly as it loads a real sweep's champion.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from memory_models.model import SequenceModel
from pipelines.checkpoint import Position, save_checkpoint
from pipelines.data import tasks
from pipelines.experiment import ExperimentConfig
from pipelines.train.logged_model import MODEL_URI_TAG, log_sequence_model
from pipelines.train.loop import TrainingModule, evaluate, lr_schedule, train_batch
from pipelines.train.tracking import MetricLogger, client_for, open_run, retrying

CHAMPION = "champion"


@dataclass(frozen=True)
class Published:
    run_id: str
    model_uri: str
    registered_model: str
    version: str
    metrics: dict[str, float]

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.registered_model}@{CHAMPION}"


def publish(
    config: ExperimentConfig, registered_model: str = "memlab-champion", steps: int = 0
) -> Published:
    """Train `config`'s model for `steps` batches (0: leave it untrained), log it, register it
    and point the alias `champion` at the new version."""
    uri = config.tracking.resolved_uri()
    client = client_for(uri)
    trained = _train(config, steps)
    run_id, _ = open_run(config)
    MetricLogger(uri, run_id).log(trained.metrics, trained.position.global_step)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder)
        trained.save(checkpoint, config)
        model_uri = log_sequence_model(run_id, checkpoint, config)
    retrying(lambda: client.set_tag(run_id, MODEL_URI_TAG, model_uri))
    retrying(lambda: client.set_terminated(run_id, status="FINISHED"))
    version = str(retrying(lambda: mlflow.register_model(model_uri, registered_model)).version)
    # The same version tags as a sweep's champion (pipelines/tune/champion.py).
    tags = {"mechanism": config.model.memory.kind, **trained.metrics}
    for key, value in tags.items():
        retrying(
            lambda k=key, v=value: client.set_model_version_tag(
                registered_model, version, k, json.dumps(v)
            )
        )
    retrying(lambda: client.set_registered_model_alias(registered_model, CHAMPION, version))
    return Published(run_id, model_uri, registered_model, version, trained.metrics)


@dataclass
class _Trained:
    model: SequenceModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    position: Position
    metrics: dict[str, float]

    def save(self, folder: Path, config: ExperimentConfig) -> None:
        """The checkpoint folder a Train worker writes (pipelines/checkpoint.py)."""
        save_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.position, config)


def _train(config: ExperimentConfig, steps: int) -> _Trained:
    torch.manual_seed(config.train.seed)
    model = config.model.build()
    module = TrainingModule(model, config.train.aux_loss_weight)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.train.lr)
    scheduler = lr_schedule(optimizer, config.train.warmup_steps, max(steps, 1), "constant")
    for batch in _batches(config, steps * config.train.batch_size, seed=config.data.seed):
        train_batch(
            module,
            batch,
            optimizer,
            scheduler,
            segment_len=config.train.segment_len,
            grad_clip=config.train.grad_clip,
        )
    test = _batches(config, 2 * config.train.batch_size, seed=config.data.seed + 1)
    kind = config.data.task.kind
    scores = evaluate(model, test, segment_len=config.train.segment_len, task_kind=kind)
    metrics = {f"val_{key}": value for key, value in scores.items()}
    position = Position(epoch=1, global_step=steps, history=[metrics])
    return _Trained(model.eval(), optimizer, scheduler, position, metrics)


def _batches(config: ExperimentConfig, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    task = config.data.task
    if task.kind == "text":
        raise ValueError("publish() generates synthetic tasks only; train text models with Ray")
    if rows == 0:
        return []
    raw = tasks.generate(task, rows, seed)
    columns = {name: torch.as_tensor(values) for name, values in raw.items()}
    size = config.train.batch_size
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, rows, size)]
