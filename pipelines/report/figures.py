"""The report's pictures, drawn from the tables of `analysis.py` into PNG files.

- `frontier.png`: accuracy against state bytes per sequence (log x), one curve per mechanism, each
  point a trial, the Pareto front drawn over them and early-stopped trials hollow: the picture of
  Zoology's figure 2 (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
  Language Models").
- `accuracy_by_configuration.png`: a heat map of accuracy per test configuration (columns) for
  every mechanism and state size (rows).
- `forgetting.png`: a heat map of accuracy per mechanism and forget threshold.
- `eviction.png`: the full-attention model's accuracy under each eviction policy against its
  state bytes, beside the sweep's trained memories (`eviction.py`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipelines.report.analysis import METRIC, by_configuration, pareto_front, threshold_effect


def frontier(trials: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against state bytes, a curve per mechanism through its trials (by state size),
    the Pareto front as a dashed step line; hollow markers for trials ASHA stopped early."""
    figure, axis = plt.subplots(figsize=(8, 5))
    scored = trials.dropna(subset=[METRIC])
    for mechanism, group in scored.groupby("mechanism"):
        group = group.sort_values("state_bytes")
        best = group.groupby("state_bytes")[METRIC].max()
        (line,) = axis.plot(best.index, best.values, marker="", label=mechanism, alpha=0.8)
        _points(axis, group, line.get_color())
    front = scored[pareto_front(scored)].sort_values("state_bytes")
    axis.step(front["state_bytes"], front[METRIC], where="post", color="black", ls="--", lw=1.2)
    axis.scatter(
        front["state_bytes"],
        front[METRIC],
        s=110,
        facecolors="none",
        edgecolors="black",
        linewidths=1.5,
        zorder=4,
        label="on the Pareto front",
    )
    axis.scatter([], [], facecolors="none", edgecolors="grey", label="stopped early (ASHA)")
    if scored.empty:
        axis.text(0.5, 0.5, "no trial finished an epoch", ha="center", transform=axis.transAxes)
    else:
        axis.set_xscale("log")
    axis.set(xlabel="state bytes per sequence (log)", ylabel="validation accuracy")
    axis.set(ylim=(-0.02, 1.02), title=title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def eviction(policies: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Path:
    """A curve per eviction policy through its cache budgets, full attention as a star, and the
    best trial of every other (mechanism, state size) of the sweep in grey for comparison."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for policy, group in policies[policies["policy"] != "full"].groupby("policy", sort=False):
        group = group.sort_values("state_bytes")
        axis.plot(group["state_bytes"], group[METRIC], marker="o", label=policy)
    full = policies[policies["policy"] == "full"]
    axis.scatter(full["state_bytes"], full[METRIC], marker="*", s=160, color="black", zorder=4)
    axis.scatter([], [], marker="*", s=80, color="black", label="full attention (same weights)")
    trained = trials.dropna(subset=[METRIC]).groupby(["mechanism", "state_bytes"])[METRIC].max()
    others = trained.drop("attention", level="mechanism", errors="ignore").reset_index()
    axis.scatter(others["state_bytes"], others[METRIC], color="grey", s=20, label="trained kinds")
    for _, point in others.iterrows():
        axis.annotate(point["mechanism"], (point["state_bytes"], point[METRIC]), fontsize=7)
    axis.set_xscale("log")
    axis.set(xlabel="state bytes per sequence (log)", ylabel="accuracy", ylim=(-0.02, 1.02))
    axis.set(title="eviction policies on the full-attention model, caches of a fraction of a row")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def _points(axis, group: pd.DataFrame, color) -> None:
    stopped = group["early_stopped"].astype(bool)
    kept = group[~stopped]
    axis.scatter(kept["state_bytes"], kept[METRIC], color=color, s=28, zorder=3)
    early = group[stopped]
    axis.scatter(
        early["state_bytes"], early[METRIC], facecolors="none", edgecolors=color, s=28, zorder=3
    )


def configuration_heat_map(trials: pd.DataFrame, path: Path) -> Path:
    """Accuracy per test configuration (columns) for every mechanism and state size (rows)."""
    table = by_configuration(trials)
    columns = [c for c in table.columns if c.startswith("T=")] or [METRIC]
    labels = [
        f"{row.mechanism} m={row.memory_size} d={row.d_model} ({_bytes(row.state_bytes)})"
        for row in table.itertuples()
    ]
    values = table[columns].to_numpy(dtype=float)
    height = max(2.5, 0.32 * len(labels) + 1.2)
    figure, axis = plt.subplots(figsize=(max(8.0, 1.1 * len(columns) + 5.0), height))
    _heat(axis, values, labels, columns)
    axis.set(xlabel="test configuration (T tokens, k key-value pairs)")
    axis.set_title("accuracy per test configuration")
    return _save(figure, path)


def forgetting_heat_map(trials: pd.DataFrame, path: Path) -> Path:
    """Accuracy per mechanism (rows) and forget threshold (columns) on forgetting-MQAR."""
    table = threshold_effect(trials)
    columns = [c for c in table.columns if c.startswith("threshold ")]
    values = table[columns].to_numpy(dtype=float)
    figure, axis = plt.subplots(figsize=(1.3 * len(columns) + 3.5, 0.45 * len(table) + 1.5))
    _heat(axis, values, list(table["mechanism"]), columns)
    axis.set_title("forgetting-MQAR accuracy by forget threshold")
    return _save(figure, path)


def _heat(axis, values: np.ndarray, rows: list[str], columns: list[str]) -> None:
    image = axis.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            colour = "black" if value > 0.6 else "white"
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    axis.figure.colorbar(image, ax=axis, label="accuracy")


def _bytes(count: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
