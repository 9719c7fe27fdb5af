"""Running training from the command line: a local (or given) Ray, and a live progress bar.

Train V2 workers run in other processes; the driver follows them through the metrics rank 0
writes to MLflow, so the progress bar needs no extra channel from the workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipelines.experiment import ExperimentConfig
from pipelines.train.driver import TrainOutcome, train
from pipelines.train.tracking import client_for


def local_ray(address: str | None = None) -> None:
    """Connect to `address` (or `RAY_ADDRESS`), else start Ray on this machine on loopback only.

    Inside a Ray job (`memlab submit`) Ray sets `RAY_ADDRESS`; the job must join that cluster, and
    Ray refuses `num_cpus` when joining one, so the local-start arguments apply only here.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # At least 4 logical CPUs: fractional Train workers, Data tasks and a Tune driver all fit on a
    # 2-core laptop without anyone waiting forever (shared/RAY_NOTES.md).
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=True,  # Train's placement-group cleanup needs the state API
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )
    _private_token()


def _private_token() -> None:
    """`ray.init` writes the cluster's auth token readable by every local user (mode 644 seen):
    only the owner should be able to reach the cluster with it."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        token.chmod(0o600)


def run_training(
    config: ExperimentConfig, ray_address: str | None = None, console: Console | None = None
) -> TrainOutcome:
    local_ray(ray_address)
    console = console or Console()
    with _progress(config, console) as follow:
        return train(config, on_run_started=follow)


@contextmanager
def _progress(config: ExperimentConfig, console: Console) -> Iterator:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}  step {task.completed:.0f}  {task.fields[shown]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(config.run_name, total=None, epoch=0, shown="starting Ray Train...")
    stop = threading.Event()

    def follow(run_id: str) -> None:
        client = client_for(config.tracking.resolved_uri())
        threading.Thread(
            target=_poll, args=(client, run_id, progress, task, stop), daemon=True
        ).start()

    with progress:
        try:
            yield follow
        finally:
            stop.set()


def _poll(client, run_id: str, progress: Progress, task, stop: threading.Event) -> None:
    while not stop.wait(2.0):
        try:
            metrics = client.get_run(run_id).data.metrics
        except Exception:  # the store may be briefly locked; the next poll will do
            continue
        shown = "  ".join(
            f"{key}={metrics[key]:.3f}"
            for key in ("train_loss", "val_accuracy", "tokens_per_second")
            if key in metrics
        )
        step = metrics.get("step", 0)
        progress.update(task, completed=step, epoch=int(metrics.get("epoch", 0)), shown=shown)
