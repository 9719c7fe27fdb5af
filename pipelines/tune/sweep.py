"""`run_sweep`: Ray Tune over experiment configs, one Ray Train job per trial (Train V2 pattern).

The sweep owns a parent MLflow run; each trial's training run is its child. At the end the results
table, the accuracy-versus-state-size plot and the heat maps (`results.py`) go to the parent run,
and the best trial's model becomes the registry's `champion` (`champion.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipelines.data.build import fill_cache
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.train.driver import train
from pipelines.train.tracking import client_for, retrying
from pipelines.tune.champion import open_parent_run, register_champions
from pipelines.tune.pbt import check_pbt_space, log_schedule_plot, pbt_scheduler, pbt_trial
from pipelines.tune.results import results_table, write_report
from pipelines.tune.settings import SweepOutcome, SweepSettings
from pipelines.tune.space import Dimension, grid_size, parse_space, tune_param_space

logger = logging.getLogger(__name__)


def run_sweep(
    base: ExperimentConfig,
    raw_space: dict[str, Any],
    settings: SweepSettings,
    *,
    resume: bool = False,
    callbacks: list[tune.Callback] | None = None,
) -> SweepOutcome:
    """Run (or with `resume`, continue) the sweep; `callbacks` are Tune callbacks in this process
    (a progress display)."""
    space = parse_space(raw_space, base)  # fails here, before any trial, on a bad key or value
    pbt = settings.scheduler == "pbt"
    if pbt:
        check_pbt_space(space, base)
    base = base.with_absolute_paths()  # trials run in their own working directories
    if not any(key.startswith("data.") for key in space):
        fill_cache(base.data)  # once here, so trials reuse the cache instead of racing on it
    storage = settings.storage_path.resolve()
    parent_run_id = open_parent_run(base, settings)
    # PBT trials train in segments and report checkpoints to Tune (`pipelines.tune.pbt`).
    trial, extra = (_trial, {})
    if pbt:
        trial, extra = pbt_trial, {"interval": settings.perturbation_interval}
    trainable = tune.with_resources(
        tune.with_parameters(
            trial, base=base, sweep=settings.name, parent_run_id=parent_run_id, **extra
        ),
        # The trial's own driver needs almost nothing; its Train workers ask for the real CPUs.
        {"cpu": 0.01},
    )
    if settings.scheduler == "asha":
        _warn_if_trials_may_leak()
    tuner = _restored(storage / settings.name, trainable, callbacks) if resume else None
    tuner = tuner or tune.Tuner(
        trainable,
        param_space=tune_param_space(space),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=pbt_scheduler(settings, space) if pbt else _scheduler(settings, base),
            search_alg=_search(settings, space),
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials or concurrent_trials(base),
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=settings.trial_retries),
            callbacks=callbacks,
        ),
    )
    results = tuner.fit()
    table = results_table(results, base, space, settings.name)
    if pbt:
        log_schedule_plot(table, base, parent_run_id, storage / settings.name / "report")
    return finish(table, base, settings, parent_run_id, storage)


def finish(
    table: pd.DataFrame,
    base: ExperimentConfig,
    settings: SweepSettings,
    parent_run_id: str,
    storage: Path,
) -> SweepOutcome:
    """Table and plots into the parent run, the winners into the registry, the run closed."""
    table_path, plots = write_report(table, storage / settings.name / "report", settings.metric)
    client = client_for(base.tracking.resolved_uri())
    for path in [table_path, *plots]:
        retrying(lambda path=path: client.log_artifact(parent_run_id, str(path)))
    champion, version = register_champions(client, table, settings)
    if champion:
        retrying(lambda: client.log_dict(parent_run_id, champion, "champion.json"))
    retrying(lambda: client.set_terminated(parent_run_id, status="FINISHED"))
    return SweepOutcome(table, table_path, plots, parent_run_id, version, champion)


def _trial(params: dict[str, Any], base: ExperimentConfig, sweep: str, parent_run_id: str) -> None:
    trial_id = tune.get_context().get_trial_id()
    overrides = dict(params) | {"run.name": f"{sweep}-{trial_id}"}
    config = apply_overrides(base, overrides)
    outcome = train(config, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])
    tune.report({**outcome.metrics, "mlflow_run_id": outcome.run_id, "done": True})


def _warn_if_trials_may_leak() -> None:
    """Ray Train frees an early-stopped trial's placement group from a cleaner actor that finds
    its cluster by scanning this machine; with several Ray instances here it fails ("Found
    multiple active Ray instances"), the group leaks, and later trials can wait forever."""
    from ray._private.services import find_gcs_addresses  # no public equivalent in Ray 2.60

    instances = set(find_gcs_addresses())
    if len(instances) > 1:
        logger.warning(
            "%d Ray instances run on this machine (%s): trials that ASHA stops early may leak "
            "their CPUs and stall the sweep. Stop the other instances or use scheduler='fifo' "
            "(memlab tune --scheduler fifo).",
            len(instances),
            ", ".join(sorted(instances)),
        )


def _restored(path: Path, trainable, callbacks) -> tune.Tuner | None:
    if not tune.Tuner.can_restore(str(path)):
        return None
    tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, restart_errored=False)
    if callbacks is not None:
        # Tune restores the callbacks pickled with the experiment (inert copies of a display);
        # Ray 2.60 has no public way to pass new ones on restore.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    return tuner


def _scheduler(settings: SweepSettings, base: ExperimentConfig):
    """ASHA with every rung before the last epoch. A trial ASHA stops at its final report would
    be killed while it logs its model, so a finished trial would leave nothing to register; with
    `stop_last_trials=False` the survivors run to their own end instead."""
    last_rung = base.train.epochs - 1
    if settings.scheduler == "fifo" or last_rung < 1:
        return FIFOScheduler()  # one epoch leaves no rung to stop at
    return ASHAScheduler(
        time_attr="epoch",
        max_t=last_rung,
        grace_period=min(settings.grace_period, last_rung),
        reduction_factor=2,
        stop_last_trials=False,
    )


def _search(settings: SweepSettings, space: dict[str, Dimension]):
    if settings.search != "optuna":
        return None  # Tune's built-in grid/random generator
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise ValueError(
            "search='optuna' needs `pip install optuna`; or use grid/random"
        ) from error
    if grid_size(space) > 1:
        raise ValueError("optuna cannot take grid dimensions; use choice instead of grid")
    return OptunaSearch()


def concurrent_trials(base: ExperimentConfig) -> int:
    """Trials that fit at once: GPUs / GPUs per trial on a GPU cluster, else CPUs / CPUs per
    trial; at least 1, so nothing waits forever."""
    scaling = base.scaling
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    if scaling.use_gpu:
        per_trial = scaling.num_workers * scaling.gpus_per_worker
        return max(1, int(resources.get("GPU", 0) // per_trial))
    # A trial also runs a driver, a Train controller and Data tasks beside its workers: count at
    # least a whole core per trial, or small machines thrash with more trials than cores.
    per_trial = max(1.0, scaling.num_workers * scaling.cpus_per_worker)
    cores = min(resources.get("CPU", 1), os.cpu_count() or 1)
    return max(1, int(cores // per_trial))
