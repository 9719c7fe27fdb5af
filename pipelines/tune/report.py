"""After a sweep: the results table, the pictures, and the champion in the MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.train.driver import MODEL_URI_TAG
from pipelines.train.tracking import (
    RUN_NAME_TAG,
    client_for,
    experiment_id,
    git_commit,
    log_config,
    retrying,
)

if TYPE_CHECKING:
    from pipelines.tune.space import Dimension
    from pipelines.tune.sweep import SweepOutcome, SweepSettings

SWEEP_TAG = "memlab.sweep"


def open_parent_run(base: ExperimentConfig, settings: SweepSettings) -> str:
    """The sweep's parent run; an interrupted sweep of the same name gets its old one back."""
    client = client_for(base.tracking.resolved_uri())
    exp = experiment_id(client, base)
    found = client.search_runs([exp], filter_string=f"tags.`{SWEEP_TAG}` = '{settings.name}'")
    if found:
        return found[0].info.run_id
    tags = {
        SWEEP_TAG: settings.name,
        "mlflow.runName": f"sweep-{settings.name}",
        "git_commit": git_commit(),
        "task": base.data.task.kind,
    }
    run = retrying(lambda: client.create_run(exp, tags=tags, run_name=f"sweep-{settings.name}"))
    log_config(client, run.info.run_id, base)
    retrying(lambda: client.log_param(run.info.run_id, "sweep", settings.model_dump_json()))
    return run.info.run_id


def results_table(
    results, base: ExperimentConfig, space: dict[str, Dimension], sweep: str
) -> pd.DataFrame:
    """One row per trial: the sampled values, its best metric, state bytes, its MLflow run."""
    rows = []
    client = client_for(base.tracking.resolved_uri())
    exp = experiment_id(client, base)
    for result in results:
        if result.config is None:
            continue
        params = {key: result.config[key] for key in space}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        config = apply_overrides(base, params | {"run.name": f"{sweep}-{trial_id}"})
        history = result.metrics_dataframe
        row: dict[str, Any] = {
            "trial": config.run.name,
            "mechanism": config.model.memory.kind,
            "memory_size": config.model.memory.memory_size,
            "forget_threshold": config.model.memory.forget_threshold,
            **{key: value for key, value in params.items() if not key.startswith("model.memory.")},
            "state_bytes": config.model.build().state_size_bytes(config.data.task.row_width),
            "val_accuracy": _best(history, "val_accuracy", max),
            "val_loss": _best(history, "val_loss", min),
            "epochs": _best(history, "epoch", max),
            "status": "error" if result.error else "ok",
        }
        row |= _child_run(client, exp, config.run.name)
        rows.append(row)
    return pd.DataFrame(rows)


def _best(history: pd.DataFrame | None, column: str, pick) -> float:
    if history is None or column not in history:
        return float("nan")
    values = history[column].dropna()
    return float(pick(values)) if len(values) else float("nan")


def _child_run(client, exp: str, run_name: str | None) -> dict[str, Any]:
    runs = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    if not runs:
        return {"mlflow_run_id": None, "model_uri": None}
    run = runs[0]
    return {"mlflow_run_id": run.info.run_id, "model_uri": run.data.tags.get(MODEL_URI_TAG)}


def finish(
    table: pd.DataFrame,
    base: ExperimentConfig,
    settings: SweepSettings,
    parent_run_id: str,
    storage: Path,
) -> SweepOutcome:
    from pipelines.tune.sweep import SweepOutcome

    folder = storage / settings.name / "report"
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / "results.csv"
    table.to_csv(table_path, index=False)
    plots = [
        accuracy_vs_state(table, folder / "accuracy_vs_state_bytes.png", settings.metric),
        heat_maps(table, folder / "accuracy_heatmaps.png", settings.metric),
    ]
    client = client_for(base.tracking.resolved_uri())
    for path in [table_path, *plots]:
        retrying(lambda path=path: client.log_artifact(parent_run_id, str(path)))
    champion, version = register_champions(client, table, settings)
    if champion:
        retrying(lambda: client.log_dict(parent_run_id, champion, "champion.json"))
    retrying(lambda: client.set_terminated(parent_run_id, status="FINISHED"))
    return SweepOutcome(table, table_path, plots, parent_run_id, version, champion)


def register_champions(client, table: pd.DataFrame, settings: SweepSettings):
    """Best trial -> alias `champion`; best per mechanism -> alias `best_<mechanism>`."""
    ranked = table.dropna(subset=["model_uri", "val_accuracy"])
    if ranked.empty:
        return {}, None
    ascending = settings.mode == "min"
    ranked = ranked.sort_values(settings.metric, ascending=ascending)
    name = settings.registered_model
    champion_version = None
    for position, (_, row) in enumerate(ranked.drop_duplicates("mechanism").iterrows()):
        version = _register(client, name, row, settings)
        retrying(
            lambda v=version, r=row: client.set_registered_model_alias(
                name, f"best_{r['mechanism']}", v
            )
        )
        if position == 0:
            retrying(lambda v=version: client.set_registered_model_alias(name, "champion", v))
            champion_version = version
    best = ranked.iloc[0].to_dict()
    champion = {k: _plain(v) for k, v in best.items()} | {
        "registered_model": name,
        "version": champion_version,
        "uri": f"models:/{name}@champion",
    }
    return champion, champion_version


def _register(client, name: str, row: pd.Series, settings: SweepSettings) -> str:
    import mlflow

    version = retrying(lambda: mlflow.register_model(row["model_uri"], name)).version
    description = (
        f"sweep {settings.name}: {row['mechanism']} memory_size={row['memory_size']} "
        f"forget_threshold={row['forget_threshold']} {settings.metric}={row[settings.metric]:.4f} "
        f"state_bytes={row['state_bytes']}"
    )
    retrying(lambda: client.update_model_version(name, version, description=description))
    for key in ("mechanism", "memory_size", "forget_threshold", "val_accuracy", "state_bytes"):
        value = json.dumps(_plain(row[key]))
        retrying(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v))
    retrying(lambda: client.set_model_version_tag(name, version, "sweep", settings.name))
    return version


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def accuracy_vs_state(table: pd.DataFrame, path: Path, metric: str) -> Path:
    """Zoology's recall-memory picture: best accuracy per state size, one curve per mechanism."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mechanism, group in table.groupby("mechanism"):
        best = group.groupby("state_bytes")[metric].max().sort_index()
        axis.plot(best.index, best.values, marker="o", label=mechanism)
    axis.set_xscale("log")
    axis.set(xlabel="state size per sequence (bytes, log)", ylabel=metric, ylim=(-0.02, 1.02))
    axis.set_title(f"{metric} against memory state size")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def heat_maps(table: pd.DataFrame, path: Path, metric: str) -> Path:
    """Accuracy over memory size x forget threshold, one panel per mechanism."""
    mechanisms = sorted(table["mechanism"].unique())
    figure, axes = plt.subplots(
        1, len(mechanisms), figsize=(4.2 * len(mechanisms), 3.6), squeeze=False
    )
    for axis, mechanism in zip(axes[0], mechanisms, strict=True):
        group = table[table["mechanism"] == mechanism]
        grid = group.pivot_table(
            index="memory_size", columns="forget_threshold", values=metric, aggfunc="max"
        )
        image = axis.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
        axis.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        axis.set(xlabel="forget_threshold", ylabel="memory_size", title=mechanism)
        for (i, j), value in np.ndenumerate(grid.values):
            if not np.isnan(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="white")
    figure.colorbar(image, ax=axes.ravel().tolist(), label=metric)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
