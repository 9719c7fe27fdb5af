"""The numbers a report shows, computed from plain tables (no Ray, no MLflow), so each is tested
on a hand-made table.

`trials`: one row per trial (`collect.trial_table`): the grid point (`mechanism`, `memory_size`,
`forget_threshold`, `d_model`, `lr`), `state_bytes`, the best `val_accuracy`, the per-test-
configuration accuracies of that epoch (`val_accuracy_seq_len_{T}_num_kv_pairs_{k}`), `epochs`
run, `max_epochs` and `early_stopped`. `epochs`: one row per (trial, epoch) in the order Tune
received them (`collect.epoch_table`): `trial_id`, `epoch`, `val_accuracy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

METRIC = "val_accuracy"
CONFIG_METRIC = re.compile(r"^val_accuracy_seq_len_(\d+)_num_kv_pairs_(\d+)$")


def pareto_front(trials: pd.DataFrame, metric: str = METRIC) -> pd.Series:
    """True for the trials no other trial beats: none with at most the state bytes and at least
    the accuracy, better in one (Zoology's figure 2 reads the frontier of accuracy against state
    size). Trials without an accuracy are never on it."""
    scored = trials.dropna(subset=[metric])
    ordered = scored.sort_values(["state_bytes", metric], ascending=[True, False])
    front, best = set(), float("-inf")
    for index, row in ordered.iterrows():
        if row[metric] > best:
            front.add(index)
            best = row[metric]
    return pd.Series([index in front for index in trials.index], index=trials.index, dtype=bool)


def config_columns(trials: pd.DataFrame) -> list[str]:
    """The per-test-configuration accuracy columns, by sequence length then pairs."""
    found = [column for column in trials.columns if CONFIG_METRIC.match(column)]
    return sorted(found, key=lambda c: tuple(int(n) for n in CONFIG_METRIC.match(c).groups()))


def config_label(column: str) -> str:
    """`val_accuracy_seq_len_64_num_kv_pairs_4` -> `T=64 k=4`."""
    seq_len, pairs = CONFIG_METRIC.match(column).groups()
    return f"T={seq_len} k={pairs}"


def by_configuration(trials: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per test configuration (columns) for every mechanism and state size (rows,
    smallest state first within a mechanism); the best trial where several share a point (the
    best learning rate, as Zoology reports), with its `lr` where the trials have one."""
    columns = config_columns(trials)
    keys = ["mechanism", "memory_size", "d_model", "state_bytes"]
    chosen = ["lr"] if "lr" in trials else []
    table = trials.assign(memory_size=trials["memory_size"].map(memory_label))
    best = table.sort_values(METRIC, ascending=False).drop_duplicates(keys)
    best = best.sort_values(["mechanism", "state_bytes", "d_model"])
    shown = best[[*keys, *chosen, METRIC, *columns]]
    out = shown.rename(columns={c: config_label(c) for c in columns})
    return out.reset_index(drop=True)


def memory_label(size: float | None) -> str:
    """A memory size as shown: `full` for attention over the whole context (`None`)."""
    return "full" if size is None or pd.isna(size) else str(int(size))


def threshold_effect(trials: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Best accuracy per mechanism (rows) and forget threshold (columns), and the threshold's
    effect: the best over thresholds minus the accuracy at threshold 0. A mechanism that was
    only run at 0 (nothing to forget) has an effect of 0 and empty other cells."""
    grid = trials.pivot_table(
        index="mechanism", columns="forget_threshold", values=metric, aggfunc="max"
    )
    grid.columns = [f"threshold {c:g}" for c in grid.columns]
    zero = grid["threshold 0"] if "threshold 0" in grid else float("nan")
    effect = grid.max(axis=1) - zero
    best = grid.idxmax(axis=1).str.removeprefix("threshold ")
    return grid.assign(best_threshold=best, effect=effect).reset_index()


@dataclass(frozen=True)
class AshaCompute:
    """Trial-epochs ASHA spent against running every trial of the grid to its last epoch.

    `to_best`: trial-epochs Tune had received when a trial first reached `best` (the grid's best
    accuracy, within `tolerance`), counting every trial's epochs in the order they arrived."""

    trials: int
    max_epochs: int
    spent: int
    full_grid: int
    to_best: int
    best: float
    early_stopped: int

    @property
    def spent_fraction(self) -> float:
        return self.spent / self.full_grid if self.full_grid else float("nan")

    @property
    def to_best_fraction(self) -> float:
        return self.to_best / self.full_grid if self.full_grid else float("nan")


def asha_compute(
    trials: pd.DataFrame, epochs: pd.DataFrame, tolerance: float = 1e-9, metric: str = METRIC
) -> AshaCompute:
    """ASHA's compute from the sweep's per-epoch results: the full grid costs every trial's
    `max_epochs`, ASHA what its trials ran."""
    full = int(trials["max_epochs"].sum())
    spent = int(trials["epochs"].fillna(0).sum())
    best = float(epochs[metric].max()) if len(epochs) else float("nan")
    reached = (epochs[metric] >= best - tolerance).to_numpy().nonzero()[0]
    to_best = int(reached[0]) + 1 if len(reached) else spent
    return AshaCompute(
        trials=len(trials),
        max_epochs=int(trials["max_epochs"].max()) if len(trials) else 0,
        spent=spent,
        full_grid=full,
        to_best=to_best,
        best=best,
        early_stopped=int(trials["early_stopped"].sum()),
    )
