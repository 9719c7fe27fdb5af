"""A finished (or interrupted) sweep as the report's two tables, read from what Tune stored on
disk (`ExperimentAnalysis`: each trial's config and per-epoch results) and the sweep's MLflow
parent run (its children's run ids). Works without a running Ray, so `--from-sweep` reads a
sweep long after it ran."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import ExperimentAnalysis

from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.report.analysis import CONFIG_METRIC, METRIC
from pipelines.train.tracking import RUN_NAME_TAG, client_for, experiment_id
from pipelines.tune.champion import SWEEP_TAG

# Tune's clock per result (`timestamp`, `time_total_s`) and the loop's own (`train_seconds`).
TIMES = ("timestamp", "time_total_s", "train_seconds")
ENDED = frozenset({"TERMINATED", "ERROR"})  # Tune's trial states that will not run again


class MissingSweep(ValueError):
    """No sweep of that name where the report looks for it."""


@dataclass(frozen=True)
class SweepTables:
    """One sweep: its trials, their epochs in arrival order, its MLflow parent run."""

    name: str
    trials: pd.DataFrame
    epochs: pd.DataFrame
    parent_run_id: str | None
    wall_seconds: float
    unfinished: int  # trials neither done nor failed: the sweep was interrupted


def read_sweep(path: Path, base: ExperimentConfig) -> SweepTables:
    """The sweep stored at `path` (storage_path / name), its grid points applied to `base`."""
    if not path.is_dir():
        raise MissingSweep(f"no sweep at {path}")
    try:
        analysis = ExperimentAnalysis(str(path))
    except ValueError as error:
        raise MissingSweep(f"no sweep at {path}: {error}") from None
    runs, parent = _mlflow_runs(base, path.name)
    rows, epochs = [], []
    unfinished = sum(trial.status not in ENDED for trial in analysis.trials)
    for trial in analysis.trials:
        history = _epochs(analysis.trial_dataframes.get(trial.trial_id))
        config = apply_overrides(base, dict(trial.config))
        row = trial_row(config, history, trial.status == "ERROR")
        rows.append(row | {"trial_id": trial.trial_id, "params": _params(trial.config)})
        epochs.append(history.assign(trial_id=trial.trial_id))
    trials = pd.DataFrame(rows)
    if len(trials):
        trials["mlflow_run_id"] = [runs.get(f"{path.name}-{t}") for t in trials["trial_id"]]
    arrived = _arrival_order(epochs)
    return SweepTables(path.name, trials, arrived, parent, _wall_seconds(arrived), unfinished)


def trial_row(config: ExperimentConfig, history: pd.DataFrame, failed: bool) -> dict[str, Any]:
    """One trial: its grid point, state bytes, the best epoch's metrics, how far it ran."""
    memory = config.model.memory
    best = _best_epoch(history)
    epochs_run = int(history["epoch"].max()) if len(history) else 0
    return {
        "mechanism": memory.kind,
        "memory_size": memory.memory_size,
        "forget_threshold": memory.forget_threshold,
        "d_model": config.model.d_model,
        "lr": config.train.lr,
        "state_bytes": config.state_bytes_per_sequence(),
        METRIC: best.get(METRIC, float("nan")),
        **{key: value for key, value in best.items() if CONFIG_METRIC.match(key)},
        "best_epoch": best.get("epoch", float("nan")),
        "epochs": epochs_run,
        "max_epochs": config.train.epochs,
        "early_stopped": not failed and 0 < epochs_run < config.train.epochs,
        "train_seconds": best.get("train_seconds_total", float("nan")),
        "status": "error" if failed else "ok",
    }


def _epochs(frame: pd.DataFrame | None) -> pd.DataFrame:
    """A trial's end-of-epoch results, one row per epoch (Tune also holds the trial's closing
    report, which repeats the last epoch)."""
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame(columns=["epoch", METRIC, "timestamp"])
    keep = [c for c in frame.columns if c in ("epoch", METRIC, *TIMES)]
    keep += [c for c in frame.columns if CONFIG_METRIC.match(c)]
    epochs = frame.dropna(subset=["epoch", METRIC])[keep].drop_duplicates("epoch")
    epochs = epochs.assign(epoch=epochs["epoch"].astype(int))
    return epochs.reset_index(drop=True)


def _best_epoch(history: pd.DataFrame) -> dict[str, Any]:
    if history.empty:
        return {}
    best = history.loc[history[METRIC].idxmax()].to_dict()
    seconds = history["train_seconds"].max() if "train_seconds" in history else float("nan")
    return best | {"train_seconds_total": float(seconds)}


def _arrival_order(epochs: list[pd.DataFrame]) -> pd.DataFrame:
    """Every trial's epochs in the order Tune received them (its timestamps, then epoch)."""
    frames = [frame for frame in epochs if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=["trial_id", "epoch", METRIC, "timestamp"])
    merged = pd.concat(frames, ignore_index=True)
    return merged.sort_values(["timestamp", "epoch"], kind="stable").reset_index(drop=True)


def _wall_seconds(epochs: pd.DataFrame) -> float:
    """From the first trial's start (its first result's time less its running time) to the
    last result."""
    if epochs.empty or "time_total_s" not in epochs:
        return 0.0
    started = (epochs["timestamp"] - epochs["time_total_s"]).min()
    return float(epochs["timestamp"].max() - started)


def _params(config: dict[str, Any]) -> str:
    """The trial's grid point as one short string."""
    parts = []
    for key, value in config.items():
        if isinstance(value, dict):
            parts += [f"{k}={v}" for k, v in value.items()]
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ", ".join(parts)


def _mlflow_runs(base: ExperimentConfig, sweep: str) -> tuple[dict[str, str], str | None]:
    """(run name -> run id of the sweep's trials, the sweep's parent run id)."""
    client = client_for(base.tracking.resolved_uri())
    exp = experiment_id(client, base)
    parents = client.search_runs([exp], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    if not parents:
        return {}, None
    parent = parents[0].info.run_id
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000
    )
    return {run.data.tags.get(RUN_NAME_TAG): run.info.run_id for run in children}, parent
