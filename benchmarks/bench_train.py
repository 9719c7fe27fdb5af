"""In-loop training time: TorchTrainer (1 worker) against the plain loop, and 2 workers against 1.

The sides train the same model (`recipes.mqar_small(kind)`, resized by the options) for the same
number of steps of the same per-worker batch, through the same `pipelines.train.loop.train_steps`
(so the same on-device loss accumulation and one host sync per logging window):

* `plain`: in this process, over the 1-worker side's training rows, read into tensors (on the
  device) before the clock starts; its step metrics go to a list;
* `ray x1`: `pipelines.train.driver.train` with 1 Train worker: the product path (Ray Data shard,
  `prepare_model`, step metrics to MLflow every `--log-every` steps from rank 0);
* `ray x2`: the same with 2 workers, each on its own shard, so twice the rows per step;
* `ray x1 @B`, `ray x2 @B`: 1 and 2 workers again at the compute-bound size (`--scale-*`: a
  larger batch and width, so each step's fixed costs - the gradient all-reduce, feeding, logging,
  Python - are small beside its arithmetic); the 2-worker speed-up is judged there.

In-loop seconds exclude Ray start-up, data preparation, evaluation, checkpoints and model logging:
on the Ray sides they are the `train_seconds` the worker returns (rank 0's wall time in its batch
loop: waiting for each batch, the step and its logging), on the plain side the same span; `CPU s`
is the CPU time of that process (the worker's, Ray Data's threads included) over the same span.
Both include the wait for the first batch. The per-step columns are medians over the logging
windows after the first, from the `time/*` metrics that `TrainWindow` logs (on the Ray sides read
back from MLflow): `steady` the whole step, `wait` for the next batch, `compute` in `train_batch`,
`log` the flush and the MLflow call; `first s` is the first window's extra wait (the stream
starting). The CPU table splits the cores' time during the steady loop (first to last logged step)
between the workers, Ray's own actors and daemons, this driver, and everything outside this run.
`all-reduce ms`: gloo all-reduce of a gradient-sized buffer between 2 Train workers, median.

`ratio` = in-loop seconds of `ray x1` / `plain` (target <= 1.10; Ray's published PyTorch parity
is within 2.5 %, its release gate 1.15). `speed-up` = rows/s of 2 workers / 1 worker (ideal 2.0,
target >= 1.6 at the compute-bound size). With `--device cuda` the sides run on the GPU (bf16
autocast, as the worker), the 2-worker sides only with 2 GPUs, and the table adds model FLOP/s
and, for attention, model FLOPs utilisation against the GPU's dense bf16 peak.

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
import ray.train
import torch
from bench_common import format_table, from_args, log, machine_info, parse_with_quick, write_json
from flops import device_error, peak_tflops, training_flops_per_token
from mlflow.tracking import MlflowClient
from process_cpu import TreeSampler
from ray.train.torch import TorchTrainer

from memory_models.registry import REGISTRY
from pipelines.data.batches import shard_batches
from pipelines.data.build import PreparedData, build_datasets
from pipelines.experiment import ExperimentConfig, apply_overrides, outputs_under
from pipelines.recipes import mqar_small
from pipelines.train.loop import StepOptions, TrainingModule, lr_schedule, to_device, train_steps

QUICK = {
    "steps": 10,
    "repeats": 1,
    "d_model": 32,
    "log_every": 5,
    "scale_steps": 10,
    "scale_batch_size": 32,
    "scale_d_model": 32,
}
PARITY, RELEASE_GATE, TARGET, SCALING_TARGET = 1.025, 1.15, 1.10, 1.6
TIME_KEYS = ("step_ms", "data_wait_ms", "compute_ms", "log_ms")
CPU_GROUPS = (
    "train workers",
    "Ray Train/Data actors",
    "Ray daemons",
    "idle Ray workers",
    "other Ray processes",
    "driver",
    "outside this run",
    "machine",
    "steal",
)
Log = Callable[[str], None]
Window = tuple[int, float, dict[str, float]]  # step, time.time() of the log, metrics


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
    scale_d_model: int
    scale_batch_size: int
    scale_steps: int
    device: str


@dataclasses.dataclass(frozen=True)
class Side:
    name: str
    workers: int  # 0: the plain loop
    config: ExperimentConfig
    data: PreparedData


@dataclasses.dataclass(frozen=True)
class Timing:
    """One run of one side."""

    in_loop_seconds: float
    cpu_seconds: float
    fit_seconds: float | None
    first_batch_seconds: float
    per_step_ms: dict[str, float]  # TIME_KEYS, medians over the windows after the first
    cpu_cores: dict[str, float]  # CPU seconds per second of the steady loop, by process group


@dataclasses.dataclass(frozen=True)
class SideRow:
    side: str
    workers: int
    steps: int
    rows_per_step: int
    in_loop_seconds: float
    cpu_seconds: float
    rows_per_second: float
    tokens_per_second: float
    model_tflops: float | None
    mfu: float | None
    first_batch_seconds: float
    per_step_ms: dict[str, float]
    cpu_cores: dict[str, float]
    fit_seconds: float | None
    runs: list[Timing]


def experiment(sizes: Sizes, root: Path, workers: int, scaled: bool = False) -> ExperimentConfig:
    """`mqar_small` resized: `workers * steps` batches of rows, one epoch of exactly `steps`."""
    batch = sizes.scale_batch_size if scaled else sizes.batch_size
    steps = sizes.scale_steps if scaled else sizes.steps
    overrides = {
        "model.d_model": sizes.scale_d_model if scaled else sizes.d_model,
        "model.n_layers": sizes.n_layers,
        "train.batch_size": batch,
        "train.epochs": 1,
        "train.max_steps_per_epoch": steps,
        "train.log_every_steps": sizes.log_every,
        "train.max_eval_batches": 1,
        "data.num_train_examples": max(workers, 1) * steps * batch,
        "data.num_test_examples": 64,
        "scaling.num_workers": max(workers, 1),
        "scaling.cpus_per_worker": 1.0,
        "scaling.use_gpu": sizes.device == "cuda",
        **outputs_under(root),
    }
    return apply_overrides(mqar_small(sizes.kind), overrides)


def time_plain(config: ExperimentConfig, data: PreparedData, sampler: TreeSampler) -> Timing:
    """The worker's loop without Ray: same model, optimiser, schedule, seed, rows and logging
    cadence; its step metrics go to a list instead of MLflow."""
    device = torch.device("cuda" if config.scaling.use_gpu else "cpu")
    batches = _in_memory_batches(config, data, device)
    torch.manual_seed(config.train.seed)
    module = TrainingModule(config.model.build(), config.train.aux_loss_weight).to(device)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    total = len(batches) * _segments_per_row(config) * config.train.epochs  # as the worker
    scheduler = lr_schedule(optimizer, config.train.warmup_steps, total, config.train.schedule)
    windows: list[Window] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in train_steps(
        module,
        batches,
        optimizer,
        scheduler,
        _options(config, device),
        log=lambda step, metrics: windows.append((step, time.time(), metrics)),
    ):
        pass
    in_loop, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return _timing(in_loop, cpu, None, windows, config, sampler)


def _options(config: ExperimentConfig, device: torch.device) -> StepOptions:
    bf16 = device.type == "cuda" and config.scaling.mixed_precision
    return StepOptions(
        segment_len=config.train.segment_len,
        grad_clip=config.train.grad_clip,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        log_every=config.train.log_every_steps,
    )


def _in_memory_batches(
    config: ExperimentConfig, data: PreparedData, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The batches the 1-worker side reads (one part each), on the device and widened as
    `to_device` does, so the plain side spends nothing on data."""
    steps = config.train.max_steps_per_epoch or 0
    batches = shard_batches(
        data.train.iterator(), config.train.batch_size, seed=config.train.seed, drop_last=True
    )
    return [to_device(batch, device) for batch in itertools.islice(batches, steps)]


def _segments_per_row(config: ExperimentConfig) -> int:
    width = config.data.task.row_width
    return -(-width // (config.train.segment_len or width))


def time_ray(config: ExperimentConfig, data: PreparedData, sampler: TreeSampler) -> Timing:
    from pipelines.train.driver import train

    started = time.perf_counter()
    outcome = train(config, data=data)
    fit = time.perf_counter() - started
    if outcome.metrics.get("step") != config.train.max_steps_per_epoch:
        raise RuntimeError(f"{config.run_name} ran {outcome.metrics.get('step')} steps")
    windows = logged_windows(config, outcome.run_id)
    metrics = outcome.metrics
    return _timing(
        metrics["train_seconds"], metrics["train_cpu_seconds"], fit, windows, config, sampler
    )


def logged_windows(config: ExperimentConfig, run_id: str) -> list[Window]:
    """Rank 0's step metrics from MLflow (`time/step_ms` is stored as `time.step_ms`)."""
    client = MlflowClient(config.tracking.resolved_uri())
    by_step: dict[int, dict[str, float]] = {}
    stamps: dict[int, float] = {}
    for key in TIME_KEYS:
        for metric in client.get_metric_history(run_id, f"time.{key}"):
            by_step.setdefault(metric.step, {})[f"time/{key}"] = metric.value
            stamps[metric.step] = metric.timestamp / 1000
    return [(step, stamps[step], by_step[step]) for step in sorted(by_step)]


def _timing(
    in_loop: float,
    cpu: float,
    fit: float | None,
    windows: list[Window],
    config: ExperimentConfig,
    sampler: TreeSampler,
) -> Timing:
    steady = windows[1:]
    per_step = {key: statistics.median(w[2][f"time/{key}"] for w in steady) for key in TIME_KEYS}
    extra_wait_ms = windows[0][2]["time/data_wait_ms"] - per_step["data_wait_ms"]
    used = sampler.usage(windows[0][1], windows[-1][1])
    seconds = used.pop("seconds", 0.0)
    cores = {group: value / seconds for group, value in used.items()} if seconds else {}
    return Timing(
        in_loop_seconds=in_loop,
        cpu_seconds=cpu,
        fit_seconds=fit,
        first_batch_seconds=extra_wait_ms * config.train.log_every_steps / 1000,
        per_step_ms=per_step,
        cpu_cores=cores,
    )


def side_row(side: Side, runs: list[Timing], flops_per_token: float | None, peak: float | None):
    config = side.config
    workers = max(side.workers, 1)
    steps = config.train.max_steps_per_epoch or 0
    in_loop = statistics.median(run.in_loop_seconds for run in runs)
    rows_per_second = workers * config.train.batch_size * steps / in_loop
    tokens_per_second = rows_per_second * config.data.task.row_width
    tflops = None if flops_per_token is None else flops_per_token * tokens_per_second / 1e12
    groups = {group for run in runs for group in run.cpu_cores}
    return SideRow(
        side=side.name,
        workers=side.workers,
        steps=steps,
        rows_per_step=workers * config.train.batch_size,
        in_loop_seconds=in_loop,
        cpu_seconds=statistics.median(run.cpu_seconds for run in runs),
        rows_per_second=rows_per_second,
        tokens_per_second=tokens_per_second,
        model_tflops=tflops,
        mfu=None if tflops is None or peak is None else tflops / (peak * workers),
        first_batch_seconds=statistics.median(run.first_batch_seconds for run in runs),
        per_step_ms={k: statistics.median(run.per_step_ms[k] for run in runs) for k in TIME_KEYS},
        cpu_cores={g: statistics.median(run.cpu_cores.get(g, 0.0) for run in runs) for g in groups},
        fit_seconds=None if side.workers == 0 else statistics.median(r.fit_seconds for r in runs),
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


def sides(sizes: Sizes, root: Path) -> list[Side]:
    """plain, ray x1, ray x2 at the default size, then ray x1, x2 at the compute-bound size;
    2-worker sides on CUDA only with 2 GPUs."""
    two_ok = sizes.device == "cpu" or torch.cuda.device_count() >= 2
    plan = [("plain", 0, False), ("ray x1", 1, False), ("ray x2", 2, False)]
    if sizes.scale_steps:
        plan += [(f"ray x1 @B{sizes.scale_batch_size}", 1, True)]
        plan += [(f"ray x2 @B{sizes.scale_batch_size}", 2, True)]
    found, data = [], {}
    for name, workers, scaled in plan:
        if workers == 2 and not two_ok:
            continue
        config = experiment(sizes, root, workers, scaled)
        key = config.data.model_dump_json()
        data[key] = data.get(key) or build_datasets(config.data)
        found.append(Side(name, workers, config, data[key]))
    return found


def measure(sizes: Sizes, root: Path, sampler: TreeSampler, log: Log) -> list[SideRow]:
    """Interleave the sides in every repeat so that a busy spell hits them all alike."""
    planned = sides(sizes, root)
    runs: dict[str, list[Timing]] = {side.name: [] for side in planned}
    for repeat in range(sizes.repeats):
        for side in planned:
            runs[side.name].append(_run(side, repeat, sampler, log))
    peak = peak_tflops(torch.device(sizes.device))
    return [
        side_row(side, runs[side.name], _flops_per_token(side.config), peak) for side in planned
    ]


def _flops_per_token(config: ExperimentConfig) -> float | None:
    return training_flops_per_token(config.model, config.data.task.row_width)


def _run(side: Side, repeat: int, sampler: TreeSampler, log: Log) -> Timing:
    # A fresh run name per repeat: the same name would resume the finished run instead.
    name = f"bench-{side.name.replace(' ', '').replace('@', '-')}-{repeat}"
    config = apply_overrides(side.config, {"run.name": name})
    timing = (
        time_plain(config, side.data, sampler)
        if side.workers == 0
        else time_ray(config, side.data, sampler)
    )
    ms = timing.per_step_ms
    log(
        f"  repeat {repeat + 1} {side.name:<13} in-loop {timing.in_loop_seconds:7.2f} s  CPU "
        f"{timing.cpu_seconds:7.2f} s  steady {ms['step_ms']:6.1f} ms/step (wait "
        f"{ms['data_wait_ms']:.1f}, compute {ms['compute_ms']:.1f}, log {ms['log_ms']:.1f})  "
        f"first batch {timing.first_batch_seconds:5.2f} s"
    )
    return timing


def allreduce_probe(config: ExperimentConfig, repeats: int = 50) -> dict[str, float]:
    """Median ms of one gloo all-reduce of a buffer the size of `config`'s gradients, between 2
    Train workers: what DDP adds to every step (one bucket: these models are under 25 MB)."""
    numel = sum(p.numel() for p in config.model.build().parameters())
    trainer = TorchTrainer(
        _allreduce_worker,
        train_loop_config={"numel": numel, "repeats": repeats},
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": config.scaling.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="allreduce-probe", storage_path=str(config.run.storage_path)
        ),
    )
    found = dict(trainer.fit().return_value)
    return found | {"gradient_bytes": 4 * numel}


def _allreduce_worker(loop_config: dict[str, int]) -> dict[str, float]:
    buffer = torch.ones(loop_config["numel"])
    for _ in range(5):
        torch.distributed.all_reduce(buffer)
    seconds = []
    for _ in range(loop_config["repeats"]):
        torch.distributed.barrier()
        started = time.perf_counter()
        torch.distributed.all_reduce(buffer)
        seconds.append(time.perf_counter() - started)
    return {"median_ms": 1000 * statistics.median(seconds), "max_ms": 1000 * max(seconds)}


def table(rows: list[SideRow]) -> str:
    headers = ["side", "workers", "steps", "rows/step", "in-loop s", "CPU s", "rows/s", "tok/s"]
    headers += ["steady ms", "wait ms", "compute ms", "log ms", "first s", "fit s"]
    flops = any(row.model_tflops is not None for row in rows)
    headers += ["TFLOP/s", "MFU"] if flops else []
    return format_table(headers, [_cells(row, flops) for row in rows])


def _cells(row: SideRow, flops: bool) -> list[str]:
    ms = row.per_step_ms
    workers = str(row.workers) if row.workers else "-"
    cells = [row.side, workers, str(row.steps), str(row.rows_per_step)]
    cells += [f"{row.in_loop_seconds:.2f}", f"{row.cpu_seconds:.2f}"]
    cells += [f"{row.rows_per_second:,.0f}", f"{row.tokens_per_second:,.0f}"]
    cells += [f"{ms[key]:.1f}" for key in TIME_KEYS]
    cells += [f"{row.first_batch_seconds:.2f}"]
    cells += ["-" if row.fit_seconds is None else f"{row.fit_seconds:.1f}"]
    if flops:
        cells += ["-" if row.model_tflops is None else f"{row.model_tflops:.3g}"]
        cells += ["-" if row.mfu is None else f"{100 * row.mfu:.1f} %"]
    return cells


def cpu_table(rows: list[SideRow]) -> str:
    """Cores busy during the steady loop, by process group (CPU seconds per second)."""
    headers = ["side", *CPU_GROUPS]
    cells = [
        [row.side, *(f"{row.cpu_cores.get(group, 0.0):.2f}" for group in CPU_GROUPS)]
        for row in rows
    ]
    return format_table(headers, cells)


def comparisons(rows: list[SideRow]) -> dict[str, object]:
    """Ratios paired within each repeat (sides run back to back), then their median: on a shared
    machine the load drifts between repeats more than between neighbouring runs."""
    named = {row.side: row for row in rows}
    plain, one = named["plain"], named["ray x1"]
    in_loop = _paired(one, plain, lambda run: run.in_loop_seconds)
    found: dict[str, object] = {
        "ray_x1_over_plain": statistics.median(in_loop),
        "ray_x1_over_plain_per_repeat": in_loop,
        "ray_x1_over_plain_of_medians": one.in_loop_seconds / plain.in_loop_seconds,
        "ray_x1_over_plain_cpu": statistics.median(_paired(one, plain, lambda r: r.cpu_seconds)),
        "ray_x1_over_plain_steady": statistics.median(_paired(one, plain, _step_ms)),
    }
    for tag, two_name, one_name in _scaling_pairs(rows):
        found |= {f"{key}{tag}": value for key, value in _scaling(named[two_name], named[one_name])}
    return found


def _scaling(two: SideRow, one: SideRow) -> list[tuple[str, object]]:
    """Rows/s of 2 workers over 1 (in-loop per repeat, and steady), the cores the workers had
    during the steady loop, and the speed-up at a core per worker: 2 workers with a core each
    against 1 with one core, from the workers' core-seconds per steady step C (all workers):
    4 * C1 / C2. It leaves out time a worker waits without using its core (the all-reduce)."""
    speed_up = [2 / r for r in _paired(two, one, lambda run: run.in_loop_seconds)]
    per_core = [4 * r for r in _paired(one, two, _step_core_seconds)]
    return [
        ("speed_up", statistics.median(speed_up)),
        ("per_repeat_speed_up", speed_up),
        ("steady_speed_up", statistics.median(2 / r for r in _paired(two, one, _step_ms))),
        ("worker_cores", [_cores(side, "train workers") for side in (one, two)]),
        ("ray_own_cores", [_cores(side, *RAY_OWN) for side in (one, two)]),
        ("per_core_speed_up", statistics.median(per_core)),
    ]


RAY_OWN = ("Ray Train/Data actors", "Ray daemons", "idle Ray workers", "other Ray processes")


def _step_ms(run: Timing) -> float:
    return run.per_step_ms["step_ms"]


def _step_core_seconds(run: Timing) -> float:
    """Worker core-seconds per steady step (all workers together)."""
    return run.per_step_ms["step_ms"] * run.cpu_cores.get("train workers", float("nan"))


def _cores(side: SideRow, *groups: str) -> float:
    return sum(side.cpu_cores.get(group, 0.0) for group in groups)


def _paired(a: SideRow, b: SideRow, value: Callable[[Timing], float]) -> list[float]:
    return [value(x) / value(y) for x, y in zip(a.runs, b.runs, strict=True)]


def _scaling_pairs(rows: list[SideRow]) -> list[tuple[str, str, str]]:
    names = {row.side for row in rows}
    pairs = [("", "ray x2", "ray x1")]
    pairs += [(f"_at_{n.split('@')[1]}", n, n.replace("x2", "x1")) for n in names if "x2 @" in n]
    return [pair for pair in pairs if pair[1] in names]


def summary(found: dict[str, object], probe: dict[str, float] | None, rows: list[SideRow]) -> str:
    ratio, steady = found["ray_x1_over_plain"], found["ray_x1_over_plain_steady"]
    repeats = ", ".join(f"{r:.3f}" for r in found["ray_x1_over_plain_per_repeat"])
    verdict = "meets" if ratio <= TARGET else "misses"
    lines = [
        f"ratio ray x1 / plain, in-loop time: {ratio:.3f} ({verdict} the target {TARGET}; Ray's "
        f"parity {PARITY}, release gate {RELEASE_GATE}); per repeat: {repeats}; of the medians: "
        f"{found['ray_x1_over_plain_of_medians']:.3f}; CPU time: "
        f"{found['ray_x1_over_plain_cpu']:.3f}; steady step: {steady:.3f}"
    ]
    lines += [_scaling_line(found, tag) for tag, _, _ in _scaling_pairs(rows)]
    if probe:
        lines.append(
            f"gloo all-reduce of the compute-bound model's gradients ({probe['gradient_bytes']:,} "
            f"bytes) between 2 workers: {probe['median_ms']:.2f} ms median, "
            f"{probe['max_ms']:.2f} ms max"
        )
    return "\n".join(lines)


def _scaling_line(found: dict[str, object], tag: str) -> str:
    cores, own = found[f"worker_cores{tag}"], found[f"ray_own_cores{tag}"]
    per_repeat = ", ".join(f"{r:.2f}" for r in found[f"per_repeat_speed_up{tag}"])
    return (
        f"speed-up x2 / x1{tag.replace('_at_', ' at ')}, rows/s: {found[f'speed_up{tag}']:.2f} "
        f"in-loop (per repeat: {per_repeat}), {found[f'steady_speed_up{tag}']:.2f} steady "
        f"(ideal 2.00; target {SCALING_TARGET} at the compute-bound size); the workers had "
        f"{cores[0]:.2f} and {cores[1]:.2f} cores, Ray's own processes {own[0]:.2f} and "
        f"{own[1]:.2f}; at a core per worker: {found[f'per_core_speed_up{tag}']:.2f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="attention", choices=list(REGISTRY))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per worker per step")
    parser.add_argument("--steps", type=int, default=200, help="steps per run, every side")
    parser.add_argument("--log-every", type=int, default=10, help="step-metric interval")
    parser.add_argument("--scale-d-model", type=int, default=128, help="compute-bound width")
    parser.add_argument("--scale-batch-size", type=int, default=128, help="compute-bound batch")
    parser.add_argument(
        "--scale-steps", type=int, default=40, help="compute-bound steps (0: skip those sides)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--output", default="train.json", help="file in benchmarks/results/")
    args = parse_with_quick(parser, argv, QUICK)
    for steps in (args.steps, args.scale_steps or args.steps):
        if steps < 2 * args.log_every or steps % args.log_every:
            parser.error(
                f"steps ({steps}) must be a multiple of --log-every ({args.log_every}), at least "
                "2 of them: the per-step times come from the logged windows after the first"
            )
    if error := device_error(args.device):
        parser.error(error)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = from_args(Sizes, args)
    torch.set_num_threads(sizes.threads)
    started = time.perf_counter()
    worker = start_ray(sizes.threads)
    log(f"ray.init {time.perf_counter() - started:.1f} s; a worker sees {worker}; {sizes}")
    sampler = TreeSampler(os.getpid()).start()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        rows = measure(sizes, Path(folder), sampler, log)
        probe = None
        if sizes.device == "cpu" and sizes.scale_steps:
            probe = allreduce_probe(experiment(sizes, Path(folder), 2, scaled=True))
    sampler.stop()
    ray.shutdown()
    found = comparisons(rows)
    log("")
    log(table(rows))
    log("")
    log("cores busy during the steady loop (CPU seconds per second), by process group:")
    log(cpu_table(rows))
    log("")
    log(summary(found, probe, rows))
    note = NOTE.format(repeats=sizes.repeats, threads=sizes.threads, cores=os.cpu_count())
    log(textwrap.fill(note, width=100))
    payload = {
        "machine": machine_info(torch=torch.__version__, ray=ray.__version__, worker=worker),
        "sizes": dataclasses.asdict(sizes),
        "note": note,
        "comparisons": found,
        "allreduce_probe": probe,
        "results": [dataclasses.asdict(row) for row in rows],
    }
    log(f"wrote {write_json(args.output, payload)}")


NOTE = (
    "Medians over {repeats} repeat(s), the sides interleaved. {threads} torch thread(s) per "
    "worker, workers at the driver's niceness. {cores} CPU core(s) on this machine, shared: "
    "'outside this run' is what other users took while the loop ran."
)


if __name__ == "__main__":
    main(sys.argv[1:])
