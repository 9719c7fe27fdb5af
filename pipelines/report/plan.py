"""What a report at a scale will run, before anything runs: trials, steps, tokens, FLOPs and the
hours they take under the scale's stated throughput; and whether the cluster can run it at all.

FLOP model (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1): training
costs 6 x parameters per token (forward 2, backward 4; the embedding is tied to the output layer,
so its one matrix counts once), plus 6 x layers x d_model x reach per token for the kinds that
attend over a cache (score and value products), reach being the mean training length, capped at
`memory_size` where that bounds the cache. Evaluation costs 2 x parameters per test token. A step
takes at least the scale's `step_floor_seconds`; a trial also pays `trial_overhead_seconds`.
The estimate is for the full grid: ASHA's early stopping only shortens it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.data.batches import batches_per_epoch
from pipelines.data.tasks.common import apportion
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.report.scales import ReportScale

# Kinds whose cost per token grows with the tokens they attend over.
ATTENDING_KINDS = frozenset(
    {"attention", "sparse", "reformer", "hierarchical", "transformer_xl", "compressive"}
)
EVAL_BATCH_ROWS = 64  # the worker's evaluation batch (`pipelines.train.worker._evaluate`)


class ScaleDoesNotFit(RuntimeError):
    """The cluster lacks what the scale's trials ask for."""


@dataclass(frozen=True)
class TrialCost:
    steps: int
    train_tokens: float
    flops: float
    seconds: float


@dataclass(frozen=True)
class SweepPlan:
    name: str
    task: str
    trials: int
    epochs: int
    steps_per_trial: int
    train_tokens: float
    flops: float
    trial_seconds: float  # the sum over trials


@dataclass(frozen=True)
class ReportPlan:
    scale: ReportScale
    sweeps: tuple[SweepPlan, ...]

    @property
    def trials(self) -> int:
        return sum(sweep.trials for sweep in self.sweeps)

    @property
    def device_hours(self) -> float:
        """Trial-hours on the scale's device (GPU hours on `gpu`, core hours on `cpu`)."""
        return sum(sweep.trial_seconds for sweep in self.sweeps) / 3600

    @property
    def wall_hours(self) -> float:
        return self.device_hours / self.scale.throughput.concurrent_trials


def plan(scale: ReportScale, name: str) -> ReportPlan:
    """Both sweeps of the report `name` at `scale`, every grid point checked and costed."""
    sweeps = (
        sweep_plan(name, scale.base_config(), scale.frontier_space(), scale),
        sweep_plan(
            f"{name}-forgetting",
            scale.base_config(forgetting=True),
            scale.forgetting_space(),
            scale,
        ),
    )
    return ReportPlan(scale, sweeps)


def sweep_plan(
    name: str, base: ExperimentConfig, space: dict[str, Any], scale: ReportScale
) -> SweepPlan:
    """Every grid point applied to `base` (an impossible combination fails here, naming it)."""
    known: dict[str, TrialCost] = {}  # the learning rate changes nothing here: one build each
    costs = []
    for config in grid_configs(base, space):
        key = config.model.model_dump_json()
        costs.append(known.get(key) or known.setdefault(key, trial_cost(config, scale)))
    return SweepPlan(
        name=name,
        task=base.data.task.kind,
        trials=len(costs),
        epochs=base.train.epochs,
        steps_per_trial=max(cost.steps for cost in costs),
        train_tokens=sum(cost.train_tokens for cost in costs),
        flops=sum(cost.flops for cost in costs),
        trial_seconds=sum(cost.seconds for cost in costs),
    )


def grid_configs(base: ExperimentConfig, space: dict[str, Any]) -> list[ExperimentConfig]:
    keys = list(space)
    values = [space[key]["grid"] for key in keys]
    return [
        apply_overrides(base, dict(zip(keys, combo, strict=True)))
        for combo in itertools.product(*values)
    ]


def trial_cost(config: ExperimentConfig, scale: ReportScale) -> TrialCost:
    steps, tokens, mean_len = _training_steps(config)
    with torch.device("meta"):  # shapes only: no memory, no time
        parameters = sum(p.numel() for p in config.model.build().parameters())
    per_token = 6 * parameters + _attending_flops(config, mean_len)
    eval_tokens = _eval_tokens(config) * config.train.epochs
    flops = per_token * tokens + 2 * parameters * eval_tokens
    rate = scale.throughput
    train_seconds = max(per_token * tokens / rate.flops_per_second, steps * rate.step_floor_seconds)
    eval_seconds = 2 * parameters * eval_tokens / rate.flops_per_second
    seconds = rate.trial_overhead_seconds + train_seconds + eval_seconds
    return TrialCost(steps=steps, train_tokens=tokens, flops=flops, seconds=seconds)


def _training_steps(config: ExperimentConfig) -> tuple[int, float, float]:
    """(optimizer steps, training tokens, mean row length) over all epochs: full batches of one
    part each, capped by `max_steps_per_epoch` (the cap keeps the parts' shares)."""
    task, train = config.data.task, config.train
    workers = config.scaling.num_workers
    rows = config.data.num_train_examples
    full = batches_per_epoch(task, rows, train.batch_size, workers)
    per_epoch = min(full, train.max_steps_per_epoch or full)
    part_rows = apportion(rows, task.part_weights())
    lengths = [task.part_seq_len(part) for part in task.part_list()]
    mean_len = sum(r * n for r, n in zip(part_rows, lengths, strict=True)) / sum(part_rows)
    tokens = per_epoch * train.epochs * train.batch_size * workers * mean_len
    return per_epoch * train.epochs, tokens, mean_len


def _attending_flops(config: ExperimentConfig, mean_len: float) -> float:
    memory = config.model.memory
    if memory.kind not in ATTENDING_KINDS:
        return 0.0
    reach = min(mean_len, memory.memory_size or mean_len)
    return 6 * config.model.n_layers * config.model.d_model * reach


def _eval_tokens(config: ExperimentConfig) -> float:
    """Test tokens one evaluation reads (all of them, or `max_eval_batches` of 64 rows)."""
    task = config.data.task.test_task()
    rows = config.data.num_test_examples
    if config.train.max_eval_batches is not None:
        rows = min(rows, config.train.max_eval_batches * EVAL_BATCH_ROWS)
    part_rows = apportion(rows, task.part_weights())
    return sum(r * task.part_seq_len(p) for r, p in zip(part_rows, task.part_list(), strict=True))


def check_fits(scale: ReportScale, resources: dict[str, float]) -> None:
    """Refuse, saying what is missing and what to do, a scale whose trials this cluster cannot
    place (`resources`: `ray.cluster_resources()`)."""
    scaling = scale.scaling
    if scaling.use_gpu:
        need = scaling.num_workers * scaling.gpus_per_worker
        have = resources.get("GPU", 0)
        if have < need:
            raise ScaleDoesNotFit(
                f"--scale {scale.name} trains each trial on {need:g} GPU(s) and this Ray cluster "
                f"has {have:g} (CPU {resources.get('CPU', 0):g}): join a GPU cluster with "
                "--ray-address, or run --scale cpu here; --dry-run shows the plan without Ray"
            )
    need = scaling.num_workers * scaling.cpus_per_worker
    if resources.get("CPU", 0) < need:
        raise ScaleDoesNotFit(
            f"--scale {scale.name} asks {need:g} CPUs per trial and this Ray cluster has "
            f"{resources.get('CPU', 0):g}"
        )


def plan_lines(report: ReportPlan) -> list[str]:
    """The plan as plain text lines (`--dry-run` prints them; report.md keeps them)."""
    scale, rate = report.scale, report.scale.throughput
    lines = [
        f"scale {scale.name}: {scale.why}",
        "  grid: " + "; ".join(f"{g.kind} {list(g.memory_sizes)}" for g in scale.mechanisms),
        f"  x d_model {list(scale.d_models)} x lr {_rates(scale.learning_rates)}"
        f"; forgetting: thresholds 0 and {scale.acting_thresholds} in each kind's range at d_model "
        f"{list(scale.forgetting_d_models)} x lr {_rates(scale.rates(forgetting=True))}",
    ]
    for sweep in report.sweeps:
        lines.append(
            f"  sweep {sweep.name} ({sweep.task}): {sweep.trials} trials x {sweep.epochs} "
            f"epochs, up to {sweep.steps_per_trial:,} steps per trial, "
            f"{sweep.train_tokens:.3g} training tokens, {sweep.flops:.3g} FLOPs"
        )
    unit = "GPU" if scale.needs_gpu else "CPU-thread"
    lines += [
        f"  total: {report.trials} trials, {report.device_hours:.1f} {unit} hours, about "
        f"{report.wall_hours:.1f} h of wall time with {rate.concurrent_trials} trials at once "
        "(the full grid; ASHA stops some trials early)",
        f"  throughput assumed: {rate.device}, {rate.flops_per_second:.3g} FLOP/s, at least "
        f"{rate.step_floor_seconds * 1000:g} ms per step, {rate.trial_overhead_seconds:g} s per "
        f"trial; {rate.basis}",
        "  FLOP model: 6 x parameters per training token (+ 6 x layers x d_model x reach for "
        "kinds that attend over a cache), 2 x parameters per test token",
    ]
    return lines


def _rates(rates: tuple[float, ...]) -> list[str]:
    return [f"{lr:.3g}" for lr in rates]
