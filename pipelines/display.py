"""Rich renderings shared by the CLI commands: live progress of training runs and sweeps, and the
sweep's results table. Kept out of the pipeline stages, which report through callbacks."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray import tune
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.train.tracking import client_for
from pipelines.tune.settings import SweepOutcome

SWEEP_COLUMNS = ("mechanism", "memory_size", "forget_threshold", "state_bytes", "val_accuracy")
POLL_SECONDS = 2.0
SHOWN_METRICS = ("train_loss", "val_accuracy", "tokens_per_second")


def sweep_table(outcome: SweepOutcome, metric: str = "val_accuracy") -> Table:
    """One row per trial, best first."""
    table = Table(title="sweep results (best first)")
    for column in SWEEP_COLUMNS:
        table.add_column(column, justify="left" if column == "mechanism" else "right")
    for _, row in outcome.table.sort_values(metric, ascending=False).iterrows():
        table.add_row(*[_cell(row[column]) for column in SWEEP_COLUMNS])
    return table


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@contextmanager
def training_progress(
    console: Console, run_name: str, tracking_uri: str, total_steps: int | None = None
) -> Iterator[Callable[[str], None]]:
    """A live bar for one training run. Yields `follow(run_id)`: once called, the bar follows
    the metrics rank 0 writes to MLflow (the Train workers run in other processes)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}  step {task.completed:.0f}  {task.fields[shown]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(run_name, total=total_steps, epoch=0, shown="starting Ray Train...")
    stop = threading.Event()

    def follow(run_id: str) -> None:
        client = client_for(tracking_uri)
        poll = threading.Thread(
            target=_poll_run, args=(client, run_id, progress, task, stop), daemon=True
        )
        poll.start()

    with progress:
        try:
            yield follow
        finally:
            stop.set()


def _poll_run(client, run_id: str, progress: Progress, task, stop: threading.Event) -> None:
    while not stop.wait(POLL_SECONDS):
        try:
            metrics = client.get_run(run_id).data.metrics
        except Exception:  # the store may be briefly locked; the next poll will do
            continue
        shown = "  ".join(f"{key}={metrics[key]:.3f}" for key in SHOWN_METRICS if key in metrics)
        step = metrics.get("step", 0)
        progress.update(task, completed=step, epoch=int(metrics.get("epoch", 0)), shown=shown)


class SweepProgress(tune.Callback):
    """Trials done out of the total and the best result so far, on one live line. Tune runs its
    callbacks in the driver process, so this updates the driver's console directly."""

    def __init__(self, progress: Progress, task, metric: str, mode: str) -> None:
        self.progress = progress
        self.task = task
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -math.inf
        self.best_trial = ""
        self.failed = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the live display stays behind, and a
        # copy restored in another process is inert (`run_sweep` hands a resumed sweep a live one).
        return self.__dict__ | {"progress": None, "task": None}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.progress is None:
            return
        value = result.get(self.metric)
        if isinstance(value, int | float) and self.sign * value > self.best:
            self.best, self.best_trial = self.sign * value, _trial_label(trial.config)
            self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.task)
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if self.progress is None:
            return
        self.failed += 1
        self.progress.advance(self.task)
        self._refresh()

    def _refresh(self) -> None:
        best = (
            f"best {self.metric} {self.sign * self.best:.4f} ({self.best_trial})"
            if self.best > -math.inf
            else "no result yet"
        )
        failed = f"  [red]{self.failed} failed[/red]" if self.failed else ""
        self.progress.update(self.task, shown=best + failed)


def _trial_label(config: dict[str, Any]) -> str:
    """`kind=gru, memory_size=64`; a whole config swept as one value shows its own fields."""
    pairs = []
    for key, value in config.items():
        inner = value.items() if isinstance(value, dict) else [(key.rsplit(".", 1)[-1], value)]
        pairs += [f"{name}={shown}" for name, shown in inner]
    return ", ".join(pairs)


@contextmanager
def sweep_progress(
    console: Console, name: str, total: int | None, metric: str, mode: str
) -> Iterator[SweepProgress]:
    """A live bar for a sweep; the yielded callback goes into `run_sweep(callbacks=[...])`."""
    progress = Progress(
        TextColumn(f"[bold]sweep {name}[/bold] trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[shown]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(name, total=total, shown="starting Ray Tune...")
    with progress:
        yield SweepProgress(progress, task, metric, mode)
