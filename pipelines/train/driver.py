"""`train(config)`: data -> MLflow run -> TorchTrainer.fit -> logged model and plot.

The same function is a Tune trial's body (pipelines/tune), so everything a sweep needs per trial
(run name from the trial, a parent MLflow run, metrics callback) comes in through arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.data.build import PreparedData, build_datasets
from pipelines.experiment import ExperimentConfig
from pipelines.train import plots
from pipelines.train.logged_model import MODEL_URI_TAG, log_sequence_model
from pipelines.train.tracking import client_for, metric_history, open_run, retrying
from pipelines.train.worker import train_worker


class TrainingError(RuntimeError):
    """A run that failed after its retries; the MLflow run and checkpoints are kept for resume."""


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    checkpoint_path: str
    model_uri: str
    resumed: bool


def train(
    config: ExperimentConfig,
    *,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    data: PreparedData | None = None,
    on_run_started: Callable[[str], None] | None = None,
    init_checkpoint: Path | None = None,
    stop_epoch: int | None = None,
) -> TrainOutcome:
    """Train `config` with Ray Train; `on_run_started(run_id)` fires once the MLflow run exists.

    `init_checkpoint` (a checkpoint folder of any run) is where a new run starts; `stop_epoch`
    ends it before `train.epochs`, without logging a model or finishing the MLflow run: one
    segment of a population-based trial (`pipelines.tune.pbt`), which the next segment continues.
    """
    config = config.with_absolute_paths()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the run has its own
    _refuse_local_store_on_a_cluster(config)
    data = data or build_datasets(config.data)
    run_id, resumed = open_run(config, parent_run_id)
    if on_run_started is not None:
        on_run_started(run_id)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "experiment": config.model_dump(mode="json"),
            "run_id": run_id,
            "tracking_uri": config.tracking.resolved_uri(),
            "train_rows": data.metadata.train_rows,
            "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
            "stop_epoch": stop_epoch,
        },
        scaling_config=_scaling(config),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=str(config.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=data.datasets(),
        dataset_config=ingest_config(),
    )
    client = client_for(config.tracking.resolved_uri())
    try:
        result = trainer.fit()
    except Exception as error:
        retrying(lambda: client.set_terminated(run_id, status="FAILED"))
        raise TrainingError(
            f"training run {config.run_name!r} failed: {error}. Its checkpoints and MLflow run "
            f"{run_id} are kept; run the same command again to resume."
        ) from error
    checkpoint_dir = Path(result.checkpoint.path)
    model_uri = ""
    if stop_epoch is None or stop_epoch >= config.train.epochs:
        model_uri = _log_results(client, run_id, checkpoint_dir, config)
        retrying(lambda: client.set_tag(run_id, MODEL_URI_TAG, model_uri))
        retrying(lambda: client.set_terminated(run_id, status="FINISHED"))
    return TrainOutcome(
        run_id=run_id,
        metrics=dict(result.return_value or result.metrics or {}),
        checkpoint_path=str(checkpoint_dir),
        model_uri=model_uri,
        resumed=resumed,
    )


def ingest_config() -> ray.train.DataConfig:
    """Nothing split, blocks in order: every rank reads the whole train set in the same block
    order and keeps its slice of each global batch (`shard_batches`), so all ranks train on the
    same length at each step; a rank that saw the blocks in another order would cut other
    batches, take another number of segments and wait forever in DDP's all-reduce."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def planned_steps(config: ExperimentConfig) -> int | None:
    """Optimizer steps the run will take (batches per worker, all epochs); None for text, whose
    row count is known only once the corpus is read."""
    if config.data.task.kind == "text":
        return None
    train = config.train
    rows_per_step = config.scaling.num_workers * train.batch_size
    per_epoch = max(1, config.data.num_train_examples // rows_per_step)
    if train.max_steps_per_epoch:
        per_epoch = min(per_epoch, train.max_steps_per_epoch)
    return per_epoch * train.epochs


def _refuse_local_store_on_a_cluster(config: ExperimentConfig) -> None:
    uri = config.tracking.resolved_uri()
    if not is_local_store(uri) or not ray.is_initialized():
        return  # the node count below costs a GCS round trip; skip it when it cannot matter
    refusal = local_store_refusal(uri, len([n for n in ray.nodes() if n.get("Alive")]))
    if refusal:
        raise TrainingError(refusal)


def is_local_store(uri: str) -> bool:
    """A tracking URI that names a file on this machine: SQLite, a file store or a bare path."""
    if uri.startswith("databricks"):
        return False  # `databricks` and `databricks://profile` name a remote workspace
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def local_store_refusal(uri: str, alive_nodes: int) -> str | None:
    """Why training must not start with tracking URI `uri` on `alive_nodes` nodes, or None.

    Train workers on another node cannot write to a file on this one: their metrics would go to a
    private copy, or nowhere, while the driver's run stays empty.
    """
    if alive_nodes <= 1 or not is_local_store(uri):
        return None
    return (
        f"MLflow tracking URI {uri!r} is a local file, but this Ray cluster has {alive_nodes} "
        "nodes whose workers cannot write to it; start a shared tracking server "
        "(cluster/mlflow-server.sh) and set MLFLOW_TRACKING_URI=http://<host>:5000"
    )


def _scaling(config: ExperimentConfig) -> ray.train.ScalingConfig:
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
    )


def _log_results(client, run_id: str, checkpoint_dir: Path, config: ExperimentConfig) -> str:
    """The trained model (loadable in a fresh process) and the curves, into the run."""
    history = metric_history(client, run_id, plots.CURVE_KEYS)
    figure_path = plots.training_curves(history, checkpoint_dir.parent / "curves.png")
    extra = [figure_path] if figure_path is not None else []
    return log_sequence_model(run_id, checkpoint_dir, config, extra_artifacts=extra)
