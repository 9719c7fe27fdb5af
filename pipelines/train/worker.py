"""The Ray Train worker: a thin shell that feeds the plain loop from dataset shards and reports.

Every rank trains on its shard of `train` under DDP; rank 0 alone evaluates (each rank gets the
whole `test` set), logs to MLflow and writes checkpoints. `ray.train.report` is a barrier, so every
rank calls it at the same points.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipelines.checkpoint import Position, restore_training, save_checkpoint
from pipelines.experiment import ExperimentConfig
from pipelines.train.loop import (
    LogFn,
    StepOptions,
    TrainingModule,
    evaluate,
    limited,
    lr_schedule,
    to_device,
    train_steps,
)
from pipelines.train.tracking import MetricLogger

# Batches Ray Data prepares ahead of the step that needs them: the next step's batch is ready
# when the current one ends, even when one block is slower to fetch.
PREFETCH_BATCHES = 2


def train_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed + rank)

    model = config.model.build()
    module = ray.train.torch.prepare_model(
        TrainingModule(model, config.train.aux_loss_weight),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    steps_per_epoch = _steps_per_epoch(config, loop_config["train_rows"], world)
    scheduler = lr_schedule(
        optimizer,
        config.train.warmup_steps,
        steps_per_epoch * _segments_per_row(config) * config.train.epochs,
        config.train.schedule,
    )
    position = _restore(model, optimizer, scheduler)
    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    autocast = torch.bfloat16 if device.type == "cuda" and config.scaling.mixed_precision else None

    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    options = StepOptions(
        segment_len=config.train.segment_len,
        grad_clip=config.train.grad_clip,
        autocast_dtype=autocast,
        log_every=config.train.log_every_steps,
    )
    log = _step_logger(logger, world) if logger is not None else None
    for epoch in range(position.epoch, config.train.epochs):
        position.epoch = epoch
        batches = _epoch_batches(train_shard, config, device, position, steps_per_epoch)
        clock = _LoopClock()
        steps = train_steps(
            module, batches, optimizer, scheduler, options, first_step=position.global_step, log=log
        )
        for step in steps:
            position.batches_done += 1
            position.global_step = step
            clock.add_to(position)
            # After the log: the crash loses a logged step, which the restore must redo.
            _maybe_inject_fault(config, position)
            if _mid_epoch_checkpoint_due(config, position, steps_per_epoch):
                _report(
                    rank,
                    {"epoch": epoch, "step": position.global_step},
                    model,
                    optimizer,
                    scheduler,
                    position,
                    config,
                )
            clock.restart()
        metrics = _evaluate(rank, model, test_shard, config, device, autocast)
        position.epoch, position.batches_done = epoch + 1, 0
        metrics |= {
            "epoch": epoch + 1,
            "step": position.global_step,
            "train_seconds": position.train_seconds,
            "train_cpu_seconds": position.train_cpu_seconds,
        }
        position.best_accuracy = max(position.best_accuracy, metrics.get("val_accuracy", 0.0))
        metrics["best_val_accuracy"] = position.best_accuracy
        position.history.append(metrics)
        if logger is not None:
            logger.log(metrics, position.global_step)
            print(_epoch_line(config, metrics), flush=True)
        _report(rank, metrics, model, optimizer, scheduler, position, config)
    return position.history[-1] if position.history else {}


def _epoch_batches(
    train_shard, config: ExperimentConfig, device: torch.device, position: Position, steps: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This epoch's batches of the shard on `device`, after those a resumed run already did."""
    batches = train_shard.iter_torch_batches(
        batch_size=config.train.batch_size,
        drop_last=True,
        local_shuffle_seed=position.epoch,
        prefetch_batches=PREFETCH_BATCHES,
        pin_memory=device.type == "cuda",
    )
    return (to_device(b, device) for b in limited(batches, steps, skip=position.batches_done))


def _maybe_inject_fault(config: ExperimentConfig, position: Position) -> None:
    """Crash once at `train.fail_once_at_step` so tests can watch a run recover."""
    if position.global_step != config.train.fail_once_at_step:
        return
    marker = config.run.storage_path / config.run_name / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected fault at step {position.global_step}")


def _steps_per_epoch(config: ExperimentConfig, train_rows: int, world: int) -> int:
    full = max(1, train_rows // (world * config.train.batch_size))
    cap = config.train.max_steps_per_epoch
    return min(full, cap) if cap else full


def _segments_per_row(config: ExperimentConfig) -> int:
    width = config.data.task.row_width
    segment = config.train.segment_len or width
    return -(-width // segment)


class _LoopClock:
    """Wall and CPU time inside the batch loop (waiting for batches, the steps, their logging),
    leaving out checkpoints and fault injection; CPU time is the whole worker process's, Ray
    Data's threads included."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def add_to(self, position: Position) -> None:
        position.train_seconds += time.perf_counter() - self.wall
        position.train_cpu_seconds += time.process_time() - self.cpu


def _step_logger(logger: MetricLogger, world: int) -> LogFn:
    """Rank 0's step metrics to MLflow; its throughput stands for every rank's."""

    def log(step: int, metrics: dict[str, float]) -> None:
        logger.log(
            metrics | {"step": step, "tokens_per_second": metrics["tokens_per_second"] * world},
            step,
        )

    return log


def _mid_epoch_checkpoint_due(config: ExperimentConfig, position: Position, steps: int) -> bool:
    every = config.train.checkpoint_every_steps
    return bool(every) and position.global_step % every == 0 and position.batches_done < steps


def _evaluate(rank, model, test_shard, config, device, autocast) -> dict[str, float]:
    if rank != 0:
        return {}
    batches = limited(
        (to_device(b, device) for b in test_shard.iter_torch_batches(batch_size=64)),
        config.train.max_eval_batches,
    )
    task = config.data.task
    metrics = evaluate(
        model,
        batches,
        segment_len=config.train.segment_len,
        task_kind=task.kind,
        bit_width=getattr(task, "width", None),
        autocast_dtype=autocast,
    )
    return {f"val_{k}": v for k, v in metrics.items()}


def _report(rank, metrics, model, optimizer, scheduler, position, config) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder), model, optimizer, scheduler, position, config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(model, optimizer, scheduler) -> Position:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as folder:
        return restore_training(Path(folder), model, optimizer, scheduler)


def _epoch_line(config: ExperimentConfig, metrics: dict[str, float]) -> str:
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") and "_num" not in k}
    return f"[memlab] {config.run_name} epoch {int(metrics['epoch'])}: {shown}"
