"""Population-based training (`memlab tune --scheduler pbt`): trials that copy the best weights
and move their memory settings and learning rate while they train.

Design. Tune's `PopulationBasedTraining` exploits by restarting a trial from another trial's
*Tune* checkpoint with a mutated config. A trial here drives a Ray Train job, and Train's
`TuneReportCallback` hands Tune metrics but no checkpoint, so a PBT trial runs its Train job in
segments of `perturbation_interval` epochs instead (`pbt_trial`): each segment is one
`train(..., init_checkpoint=..., stop_epoch=...)` and ends with
`tune.report(metrics, checkpoint=<that segment's Train checkpoint>)`. When PBT exploits, Tune
restarts the trial function with the donor's checkpoint (`tune.get_checkpoint()`) and the mutated
config; the next segment starts from that checkpoint, the same format a resume reads, and the
worker then applies the trial's own settings (`worker._apply_settings`: the model is built from
the mutated config, the learning rate is set under the restored schedule). Each segment costs one
Train start-up (seconds), the price of exploiting through the one checkpoint format.

`synch=True`: every trial reaches a perturbation point before any exploits, so a small
population (2-4 trials, as on a laptop) always has a donor with a checkpoint; with `synch=False`
the first trial at a point has nobody to compare with and never becomes a donor there.

Only shape-free settings move: `model.memory.memory_size` for kinds whose weights do not depend
on it, `model.memory.forget_threshold` and `train.lr`; a shape-bound request is refused before
any Ray work (`check_pbt_space`). A trial's settings against training steps are MLflow metrics
(`schedule.*`, written by the worker at each segment's start), drawn for the whole sweep by
`log_schedule_plot` into the sweep's parent run.
"""

from __future__ import annotations

import functools
import hashlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.result import DONE
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from pipelines.checkpoint import read_position
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.train.capacity import refuse_shape_bound
from pipelines.train.driver import train
from pipelines.train.plots import SCHEDULE_KEYS, schedules
from pipelines.train.tracking import client_for, metric_history, retrying
from pipelines.tune.settings import SweepSettings
from pipelines.tune.space import Dimension, SpaceError

#: The keys PBT may mutate: those that change between steps without changing a weight's shape.
MUTABLE_KEYS = ("model.memory.memory_size", "model.memory.forget_threshold", "train.lr")
PLOT_FILE = "pbt_schedules.png"


def check_pbt_space(space: dict[str, Dimension], base: ExperimentConfig) -> None:
    """Refuse, before any Ray work, a PBT space that would move what cannot move."""
    mutated = [key for key in MUTABLE_KEYS if key in space]
    if not mutated:
        raise SpaceError(
            f"scheduler=pbt needs at least one of {', '.join(MUTABLE_KEYS)} in the search space "
            'to mutate (e.g. --space \'{"train.lr": {"loguniform": [1e-4, 1e-2]}}\')'
        )
    if "model.memory.memory_size" not in space:
        return
    sizes = space["model.memory.memory_size"]
    if sizes.grid is None and sizes.choice is None:
        raise SpaceError("scheduler=pbt moves memory_size between listed sizes: give a grid")
    if base.train.capacity.active:
        raise SpaceError(
            "scheduler=pbt and train.capacity.policy=loss would both move memory_size; "
            "set train.capacity.policy=fixed or drop model.memory.memory_size from the space"
        )
    kinds = space.get("model.memory.kind")
    for kind in kinds.probe_values() if kinds else [base.model.memory.kind]:
        refuse_shape_bound(
            kind,
            "memory_size",
            asked_by="memlab tune --scheduler pbt",
            fix="Drop model.memory.memory_size from the space (compare fixed sizes with "
            "--scheduler asha) or drop that kind",
        )


def pbt_scheduler(settings: SweepSettings, space: dict[str, Dimension]) -> PopulationBasedTraining:
    """Perturb every `perturbation_interval` epochs: the listed sizes shift to a neighbour,
    ranges scale by 0.8 or 1.2 (then clipped into the range), a quarter resampled."""
    mutations = {key: _mutation(space[key]) for key in MUTABLE_KEYS if key in space}
    bounds = {
        key: space[key].loguniform or space[key].uniform
        for key in mutations
        if space[key].loguniform or space[key].uniform
    }
    return _KeepFinalResults(
        time_attr="epoch",
        perturbation_interval=settings.perturbation_interval,
        hyperparam_mutations=mutations,
        custom_explore_fn=functools.partial(_clipped, bounds=bounds),
        synch=True,
    )


class _KeepFinalResults(PopulationBasedTraining):
    """PBT that leaves a trial's final report alone. Exploiting there would give the trial a new
    config after its last segment logged its model: the results table (and so the champion)
    would name settings its model was never trained with."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(DONE):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _mutation(dimension: Dimension):
    if dimension.grid is not None or dimension.choice is not None:
        return list(dimension.grid or dimension.choice or [])
    return dimension.to_tune()


def _clipped(config: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """A perturbed range value back into its range (x 1.2 can leave it: a threshold of 1)."""
    return config | {key: min(max(config[key], low), high) for key, (low, high) in bounds.items()}


def pbt_trial(
    params: dict[str, Any],
    base: ExperimentConfig,
    sweep: str,
    parent_run_id: str,
    interval: int,
) -> None:
    """One member of the population: train in segments from wherever Tune starts it (nothing,
    its own last checkpoint, or a donor's) and report each segment's end with its checkpoint."""
    trial_id = tune.get_context().get_trial_id()
    config = apply_overrides(base, dict(params) | {"run.name": f"{sweep}-{trial_id}"})
    with ExitStack() as stack:
        start = tune.get_checkpoint()
        folder = Path(stack.enter_context(start.as_directory())) if start else None
        epoch = read_position(folder).epoch if folder else 0
        while epoch < config.train.epochs:
            stop = min(config.train.epochs, epoch + interval)
            outcome = train(
                _segment(config, trial_id, folder, epoch),
                parent_run_id=parent_run_id,
                init_checkpoint=folder,
                stop_epoch=stop,
            )
            folder, epoch = Path(outcome.checkpoint_path), stop
            metrics = outcome.metrics | {"mlflow_run_id": outcome.run_id, "epoch": stop}
            tune.report(
                metrics | {"done": stop >= config.train.epochs},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


def _segment(
    config: ExperimentConfig, trial_id: str, start: Path | None, epoch: int
) -> ExperimentConfig:
    """The segment's Train run storage: named by where it starts, so a trial restarted after a
    crash resumes its own segment, and one restarted from a donor starts a new one."""
    origin = hashlib.sha1(str(start).encode()).hexdigest()[:10] if start else "fresh"
    storage = config.run.storage_path / "pbt" / trial_id / f"epoch{epoch}-{origin}"
    return apply_overrides(config, {"run.storage_path": str(storage)})


def log_schedule_plot(
    table: pd.DataFrame, base: ExperimentConfig, parent_run_id: str, folder: Path
) -> Path | None:
    """Every trial's memory_size, forget_threshold and lr against its training step, in one PNG
    logged to the sweep's parent run."""
    client = client_for(base.tracking.resolved_uri())
    histories = {
        row.trial: metric_history(client, row.mlflow_run_id, SCHEDULE_KEYS)
        for row in table.itertuples()
        if isinstance(row.mlflow_run_id, str)
    }
    path = schedules(histories, folder / PLOT_FILE)
    if path is not None:
        retrying(lambda: client.log_artifact(parent_run_id, str(path)))
    return path
