"""After a sweep: one row per trial, and the pictures drawn from those rows.

The row names are the config's own: `mechanism` is `model.memory.kind`, `memory_size` and
`forget_threshold` are the memory config's fields of the same names, and any other swept key keeps
its dotted config path, so the table, the MLflow params and the registry tags read alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.train.logged_model import MODEL_URI_TAG
from pipelines.train.tracking import RUN_NAME_TAG, client_for, experiment_id
from pipelines.tune.space import Dimension

MEMORY_PREFIX = "model.memory."


def results_table(
    results, base: ExperimentConfig, space: dict[str, Dimension], sweep: str
) -> pd.DataFrame:
    """One row per trial: the sampled values, its best metric, state bytes, its MLflow run."""
    client = client_for(base.tracking.resolved_uri())
    exp = experiment_id(client, base)
    rows = []
    for result in results:
        if result.config is None:
            continue
        params = {key: result.config[key] for key in space}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        config = apply_overrides(base, params | {"run.name": f"{sweep}-{trial_id}"})
        rows.append(
            _row(config, params, result.metrics_dataframe, result.error)
            | _child_run(client, exp, config.run.name)
        )
    return pd.DataFrame(rows)


def _row(config: ExperimentConfig, params: dict, history, error) -> dict[str, Any]:
    memory = config.model.memory
    return {
        "trial": config.run.name,
        "mechanism": memory.kind,
        "memory_size": memory.memory_size,
        "forget_threshold": memory.forget_threshold,
        # A whole memory config swept as one value (`memlab report`) is in the columns above.
        **{key: value for key, value in params.items() if not _memory_key(key)},
        "state_bytes": config.state_bytes_per_sequence(),
        "val_accuracy": _best(history, "val_accuracy", max),
        "val_loss": _best(history, "val_loss", min),
        # What the memory's bound and threshold did when scored: 0 means neither acted.
        "evictions_per_token": _last_layer_mean(history, "evictions_per_token"),
        "epochs": _best(history, "epoch", max),
        "status": "error" if error else "ok",
    }


def _last_layer_mean(history: pd.DataFrame | None, metric: str) -> float:
    """The last evaluation's `val_memory/layer{i}/{metric}`, averaged over layers."""
    if history is None:
        return float("nan")
    columns = [c for c in history if c.startswith("val_memory/") and c.endswith(f"/{metric}")]
    last = history[columns].dropna(how="all")
    return float(last.iloc[-1].mean()) if columns and len(last) else float("nan")


def _memory_key(key: str) -> bool:
    return key == MEMORY_PREFIX.rstrip(".") or key.startswith(MEMORY_PREFIX)


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


def plain(value: Any) -> Any:
    """A table cell as a JSON-ready Python value (numpy scalars unwrapped, NaN as None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def write_report(table: pd.DataFrame, folder: Path, metric: str) -> tuple[Path, list[Path]]:
    """The table as CSV and its pictures as PNG in `folder`: (table path, plot paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / "results.csv"
    table.to_csv(table_path, index=False)
    plots = [
        accuracy_vs_state(table, folder / "accuracy_vs_state_bytes.png", metric),
        heat_maps(table, folder / "accuracy_heatmaps.png", metric),
    ]
    return table_path, plots


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
