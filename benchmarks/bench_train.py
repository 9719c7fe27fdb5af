"""In-loop training time: TorchTrainer (1 worker) against the plain loop, and 2 workers against 1.

Three sides train the same model (`recipes.mqar_small(kind)`, resized by the options) for the same
number of steps of the same per-worker batch:

* `plain`: `pipelines.train.loop.train_batch` in this process, over the 1-worker side's training
  rows, read into tensors before the clock starts;
* `ray x1`: `pipelines.train.driver.train` with 1 Train worker: the product path (Ray Data shard,
  `prepare_model`, step metrics to MLflow every `--log-every` steps from rank 0);
* `ray x2`: the same with 2 workers, each on its own shard, so twice the rows per step.

In-loop seconds exclude Ray start-up, data preparation, evaluation, checkpoints and model logging:
on the Ray sides they are the `train_seconds` the worker returns (rank 0's wall time in its batch
loop: waiting for each batch, the step and its logging), on the plain side the same span around
its loop. They include the wait for the first batch, in which Ray Data starts the epoch's stream.
`steady ms` leaves that out: the in-loop time per step between the first and the last logged step
(on the Ray sides from the timestamps of rank 0's step metrics in MLflow). `compute ms` is the
median `train_batch` alone (on the Ray sides from the `tokens_per_second` rank 0 logged), so
`steady - compute` is what feeding batches and logging cost per step. `fit s` is the whole
`train()` call, for scale.

`ratio` = in-loop seconds of `ray x1` / `plain`: Ray's published PyTorch parity is within 2.5 %
and its release gate 1.15. `speed-up` = rows/s of `ray x2` / rows/s of `ray x1` (ideal 2.0).
Every worker and the plain side get `--threads` torch threads and the same scheduling priority.

Run from the repository root: `.venv/bin/python benchmarks/bench_train.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from bench_common import format_table, log, machine_info, parse_with_quick, write_json
from mlflow.tracking import MlflowClient

from memory_models.registry import REGISTRY
from pipelines.data.batches import shard_batches
from pipelines.data.build import PreparedData, build_datasets
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.recipes import mqar_small
from pipelines.train.loop import TrainingModule, lr_schedule, to_device, train_batch

QUICK = {"steps": 10, "repeats": 1, "d_model": 32, "log_every": 5}
PARITY, RELEASE_GATE = 1.025, 1.15
Log = Callable[[str], None]
NOTE = (
    "in-loop s: median over {repeats} repeat(s) of the wall time inside the batch loop (Ray "
    "sides: rank 0's train_seconds), first batch included. steady ms: in-loop time per step "
    "after the first logged step. compute ms: median train_batch. fit s: the whole train() "
    "call. rows/s: rows of all workers per in-loop second. {threads} torch thread(s) per "
    "worker, workers at the driver's niceness. {cores} CPU core(s) on this machine: with no more "
    "cores than workers, and Ray's own processes beside them, 2 workers should not be expected "
    "to run twice as fast."
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    kind: str
    d_model: int
    n_layers: int
    batch_size: int
    steps: int
    log_every: int
    repeats: int
    threads: int


@dataclasses.dataclass(frozen=True)
class Timing:
    """One run of one side."""

    in_loop_seconds: float
    steady_step_seconds: float  # in-loop time per step between the first and last logged step
    compute_step_seconds: float  # median train_batch
    fit_seconds: float


@dataclasses.dataclass(frozen=True)
class SideRow:
    side: str
    workers: int
    steps: int
    rows_per_step: int
    in_loop_seconds: float
    rows_per_second: float
    steady_ms: float
    compute_ms: float
    fit_seconds: float | None
    runs: list[Timing]


def experiment(sizes: Sizes, root: Path, workers: int) -> ExperimentConfig:
    """`mqar_small` resized: `workers * steps` batches of rows, one epoch of exactly `steps`."""
    overrides = {
        "model.d_model": sizes.d_model,
        "model.n_layers": sizes.n_layers,
        "train.batch_size": sizes.batch_size,
        "train.epochs": 1,
        "train.max_steps_per_epoch": sizes.steps,
        "train.log_every_steps": sizes.log_every,
        "train.max_eval_batches": 1,
        "data.num_train_examples": workers * sizes.steps * sizes.batch_size,
        "data.num_test_examples": 64,
        "data.cache_dir": str(root / "data"),
        "scaling.num_workers": workers,
        "scaling.cpus_per_worker": 1.0,
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "run.storage_path": str(root / "ray"),
    }
    return apply_overrides(mqar_small(sizes.kind), overrides)


def time_plain(config: ExperimentConfig, data: PreparedData) -> Timing:
    """The worker's loop without Ray: same model, optimiser, schedule, seed and rows."""
    batches = _in_memory_batches(config, data)
    torch.manual_seed(config.train.seed)
    module = TrainingModule(config.model.build(), config.train.aux_loss_weight)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    total = len(batches) * _segments_per_row(config) * config.train.epochs  # as the worker
    scheduler = lr_schedule(optimizer, config.train.warmup_steps, total, config.train.schedule)
    compute, ends = [], []
    started = time.perf_counter()
    for batch in batches:
        result = train_batch(
            module,
            batch,
            optimizer,
            scheduler,
            segment_len=config.train.segment_len,
            grad_clip=config.train.grad_clip,
        )
        compute.append(result.seconds)
        ends.append(time.perf_counter())
    every = config.train.log_every_steps
    first, last = every, every * (len(ends) // every)  # the steps the Ray side logs
    steady = (ends[last - 1] - ends[first - 1]) / (last - first)
    return Timing(ends[-1] - started, steady, statistics.median(compute), ends[-1] - started)


def _in_memory_batches(config: ExperimentConfig, data: PreparedData) -> list[dict]:
    """The batches the 1-worker side reads (one part each), widened as `to_device` does."""
    steps = config.train.max_steps_per_epoch or 0
    batches = shard_batches(
        data.train.iterator(), config.train.batch_size, seed=config.train.seed, drop_last=True
    )
    return [to_device(batch, torch.device("cpu")) for batch in itertools.islice(batches, steps)]


def _segments_per_row(config: ExperimentConfig) -> int:
    width = config.data.task.row_width
    return -(-width // (config.train.segment_len or width))


def time_ray(config: ExperimentConfig, data: PreparedData) -> Timing:
    from pipelines.train.driver import train

    started = time.perf_counter()
    outcome = train(config, data=data)
    fit = time.perf_counter() - started
    if outcome.metrics.get("step") != config.train.max_steps_per_epoch:
        raise RuntimeError(f"{config.run_name} ran {outcome.metrics.get('step')} steps")
    steady, compute = logged_step_seconds(config, outcome.run_id)
    return Timing(outcome.metrics["train_seconds"], steady, compute, fit)


def logged_step_seconds(config: ExperimentConfig, run_id: str) -> tuple[float, float]:
    """(steady in-loop, median compute) seconds per step, from what rank 0 logged.

    Steady: the span between the first and last logged step's timestamps (ms). Compute: from
    `tokens_per_second`, which rank 0 logs as its own rate times the number of workers.
    """
    client = MlflowClient(config.tracking.resolved_uri())
    history = sorted(client.get_metric_history(run_id, "tokens_per_second"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    steady = (last.timestamp - first.timestamp) / 1000 / (last.step - first.step)
    tokens = config.train.batch_size * config.data.task.row_width * config.scaling.num_workers
    return steady, statistics.median(tokens / metric.value for metric in history)


def side_row(side: str, config: ExperimentConfig, runs: list[Timing], ray_side: bool) -> SideRow:
    workers = config.scaling.num_workers if ray_side else 1
    steps = config.train.max_steps_per_epoch or 0
    in_loop = statistics.median(run.in_loop_seconds for run in runs)
    return SideRow(
        side=side,
        workers=workers,
        steps=steps,
        rows_per_step=workers * config.train.batch_size,
        in_loop_seconds=in_loop,
        rows_per_second=workers * config.train.batch_size * steps / in_loop,
        steady_ms=1000 * statistics.median(run.steady_step_seconds for run in runs),
        compute_ms=1000 * statistics.median(run.compute_step_seconds for run in runs),
        fit_seconds=statistics.median(run.fit_seconds for run in runs) if ray_side else None,
        runs=runs,
    )


def start_ray(threads: int) -> dict[str, int]:
    """A private local cluster; returns what a worker sees (niceness, torch threads).

    Ray lowers its workers' priority (niceness 15) by default; on a busy machine that alone would
    slow the Ray sides against the plain loop in this process, so workers keep the driver's.
    """
    ray.init(
        num_cpus=4,
        include_dashboard=True,  # Train's placement-group cleanup needs the state API
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        # On a busy machine the dashboard agent took over a minute to start, and the raylet gave
        # up waiting for it.
        _system_config={"worker_niceness": 0, "agent_register_timeout_ms": 300_000},
    )
    return ray.get(ray.remote(num_cpus=1)(_worker_view).remote())


def _worker_view() -> dict[str, int]:
    return {"niceness": os.nice(0), "torch_threads": torch.get_num_threads()}


def measure(sizes: Sizes, root: Path, log: Log) -> list[SideRow]:
    """Interleave the sides in every repeat so that a busy spell hits them all alike."""
    one, two = experiment(sizes, root, 1), experiment(sizes, root, 2)
    data_one, data_two = build_datasets(one.data), build_datasets(two.data)
    sides = (("plain", one, data_one), ("ray x1", one, data_one), ("ray x2", two, data_two))
    runs: dict[str, list[Timing]] = {side: [] for side, _, _ in sides}
    for repeat in range(sizes.repeats):
        for side, config, data in sides:
            runs[side].append(_run(side, config, data, repeat, log))
    return [
        side_row("plain", one, runs["plain"], ray_side=False),
        side_row("ray x1", one, runs["ray x1"], ray_side=True),
        side_row("ray x2", two, runs["ray x2"], ray_side=True),
    ]


def _run(side: str, config: ExperimentConfig, data: PreparedData, repeat: int, log: Log) -> Timing:
    # A fresh run name per repeat: the same name would resume the finished run instead.
    config = apply_overrides(config, {"run.name": f"bench-{side.replace(' ', '')}-{repeat}"})
    timing = time_plain(config, data) if side == "plain" else time_ray(config, data)
    log(
        f"  repeat {repeat + 1} {side:<7} in-loop {timing.in_loop_seconds:7.2f} s  steady "
        f"{1000 * timing.steady_step_seconds:6.1f} ms/step  compute "
        f"{1000 * timing.compute_step_seconds:6.1f} ms/step  whole {timing.fit_seconds:6.1f} s"
    )
    return timing


def table(rows: list[SideRow]) -> str:
    headers = ["side", "workers", "steps", "rows/step", "in-loop s", "rows/s"]
    headers += ["steady ms", "compute ms", "fit s"]
    cells = [
        [
            row.side,
            str(row.workers),
            str(row.steps),
            str(row.rows_per_step),
            f"{row.in_loop_seconds:.2f}",
            f"{row.rows_per_second:,.0f}",
            f"{row.steady_ms:.1f}",
            f"{row.compute_ms:.1f}",
            "-" if row.fit_seconds is None else f"{row.fit_seconds:.1f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def comparisons(rows: list[SideRow]) -> dict[str, float]:
    plain, one, two = rows
    return {
        "ray_x1_over_plain": one.in_loop_seconds / plain.in_loop_seconds,
        "ray_x1_over_plain_steady": one.steady_ms / plain.steady_ms,
        "ray_x1_over_plain_compute": one.compute_ms / plain.compute_ms,
        "speed_up_x2_over_x1": two.rows_per_second / one.rows_per_second,
        "speed_up_x2_over_x1_steady": 2 * one.steady_ms / two.steady_ms,
    }


def summary(found: dict[str, float]) -> str:
    ratio = found["ray_x1_over_plain"]
    verdict = "within" if ratio <= PARITY else "inside" if ratio <= RELEASE_GATE else "outside"
    gate = "parity (2.5 %)" if verdict == "within" else "Ray's release gate (1.15)"
    return (
        f"ratio ray x1 / plain, in-loop time: {ratio:.3f} ({verdict} {gate}); steady: "
        f"{found['ray_x1_over_plain_steady']:.3f}; compute: "
        f"{found['ray_x1_over_plain_compute']:.3f}\n"
        f"speed-up ray x2 / ray x1, rows/s: {found['speed_up_x2_over_x1']:.2f} in-loop, "
        f"{found['speed_up_x2_over_x1_steady']:.2f} steady (ideal 2.00)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="attention", choices=list(REGISTRY))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per worker per step")
    parser.add_argument("--steps", type=int, default=200, help="steps per run, every side")
    parser.add_argument("--log-every", type=int, default=10, help="MLflow step-metric interval")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--output", default="train.json", help="file in benchmarks/results/")
    args = parse_with_quick(parser, argv, QUICK)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must be at least 2 x --log-every: steady time spans logged steps")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    return Sizes(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Sizes)})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = sizes_from(args)
    torch.set_num_threads(sizes.threads)
    started = time.perf_counter()
    worker = start_ray(sizes.threads)
    log(f"ray.init {time.perf_counter() - started:.1f} s; a worker sees {worker}; {sizes}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        rows = measure(sizes, Path(folder), log)
    ray.shutdown()
    found = comparisons(rows)
    note = NOTE.format(repeats=sizes.repeats, threads=sizes.threads, cores=os.cpu_count())
    log("")
    log(table(rows))
    log(summary(found))
    log(textwrap.fill(note, width=100))
    payload = {
        "machine": machine_info(torch=torch.__version__, ray=ray.__version__, worker=worker),
        "sizes": dataclasses.asdict(sizes),
        "note": note,
        "comparisons": found,
        "results": [dataclasses.asdict(row) for row in rows],
    }
    log(f"wrote {write_json(args.output, payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
