"""The Ray Train worker: a thin shell that feeds the plain loop from dataset shards and reports.

Every rank reads the whole `train` split and trains on its slice of each global batch under DDP
(`shard_batches`: all ranks train on the same length at each step); rank 0 alone evaluates, logs
to MLflow and writes checkpoints. `ray.train.report` is a barrier, so every
rank calls it at the same points: at mid-epoch checkpoints and at the end of each epoch, not per
logging window (Tune's ASHA stops trials by epoch, on validation metrics). Step metrics are read
from the device once per `train.log_every_steps` (`train_steps`) and reach MLflow in batches.

A run may start from another run's checkpoint (`init_checkpoint`: population-based training's
exploit) and stop before its last epoch (`stop_epoch`: one PBT segment); its own checkpoint, after
a crash, wins over `init_checkpoint`. After any restore the config's learning rate and memory
settings are applied again (`_apply_settings`), so a trial continues a donor's weights with its
own, possibly mutated, settings. With `train.capacity.policy=loss` rank 0 runs the capacity
controller at each evaluation and every rank applies its decision (`_control_capacity`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from memory_models.model import SequenceModel
from pipelines.checkpoint import Position, restore_training, save_checkpoint
from pipelines.data import DataError
from pipelines.data.batches import batches_per_epoch, shard_batches
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.train.capacity import CapacityController, move_memory, set_base_lr
from pipelines.train.loop import (
    Batch,
    LogFn,
    StartedEarly,
    StepOptions,
    TrainingModule,
    evaluate,
    limited,
    lr_schedule,
    to_device,
    train_steps,
)
from pipelines.train.tracking import MetricLogger

# Blocks Ray Data fetches ahead of the one being cut into batches: the next step's batch is
# ready when the current one ends, even when one block is slower to fetch.
PREFETCH_BLOCKS = 2
# Step metrics wait at most this long on rank 0 before going to MLflow together (MetricLogger).
STEP_METRICS_HOLD_SECONDS = 10.0


@dataclass
class _Run:
    """One rank's training: what every step and report needs."""

    config: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    model: SequenceModel
    module: torch.nn.Module  # TrainingModule (under DDP with more than one worker) once set up
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    position: Position
    steps_per_epoch: int
    logger: MetricLogger | None  # rank 0 only, once set up
    stop_epoch: int  # train until this many epochs are done (a PBT segment stops early)
    test_shard: Any = None

    @property
    def autocast(self) -> torch.dtype | None:
        bf16 = self.device.type == "cuda" and self.config.scaling.mixed_precision
        return torch.bfloat16 if bf16 else None


def train_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    run, batches = _setup(loop_config, train_shard)
    run.test_shard = test_shard
    epochs = run.stop_epoch
    try:
        for epoch in range(run.position.epoch, epochs):
            run.position.epoch = epoch
            _train_epoch(run, batches)
            if epoch + 1 < epochs:  # the next epoch's stream starts during this evaluation
                batches = _epoch_batches(run, train_shard, epoch + 1, skip=0)
            _end_epoch(run, test_shard)
    finally:
        if run.logger is not None:
            run.logger.flush()  # held step metrics reach MLflow also when a step raised
    return run.position.history[-1] if run.position.history else {}


def _setup(loop_config: dict[str, Any], train_shard) -> tuple[_Run, Iterator[Batch]]:
    """The model, optimiser and schedule, restored from the last checkpoint if there is one, and
    the first epoch's batches.

    The optimiser and the restore come before DDP (they hold the same parameters, already on the
    device), so the first epoch's stream starts while the MLflow client and DDP set up.
    """
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed + rank)
    model = config.model.build().to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    steps_per_epoch = _steps_per_epoch(config, loop_config["train_rows"], world)
    scheduler = lr_schedule(
        optimizer,
        config.train.warmup_steps,
        steps_per_epoch * _segments_per_row(config) * config.train.epochs,
        config.train.schedule,
    )
    position = _restore(model, optimizer, scheduler, loop_config.get("init_checkpoint"))
    run = _Run(
        config=config,
        rank=rank,
        world=world,
        device=device,
        model=model,
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position=position,
        steps_per_epoch=steps_per_epoch,
        logger=None,
        stop_epoch=loop_config.get("stop_epoch") or config.train.epochs,
    )
    _apply_settings(run)
    batches = _epoch_batches(run, train_shard, position.epoch, skip=position.batches_done)
    if rank == 0:
        uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
        run.logger = MetricLogger(uri, run_id, hold_seconds=STEP_METRICS_HOLD_SECONDS)
        run.logger.log(_schedule(run), position.global_step)
    run.module = ray.train.torch.prepare_model(
        TrainingModule(model, config.train.aux_loss_weight),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    return run, batches


def _train_epoch(run: _Run, batches: Iterator[Batch]) -> None:
    """The rest of the current epoch: steps, their metrics, fault injection, checkpoints."""
    config, position = run.config, run.position
    options = StepOptions(
        segment_len=config.train.segment_len,
        grad_clip=config.train.grad_clip,
        autocast_dtype=run.autocast,
        log_every=config.train.log_every_steps,
    )
    log = _step_logger(run.logger, run.world) if run.logger is not None else None
    clock = _LoopClock()
    first = position.global_step
    for step in train_steps(
        run.module, batches, run.optimizer, run.scheduler, options, first_step=first, log=log
    ):
        position.batches_done += 1
        position.global_step = step
        clock.add_to(position)
        # After the log: the crash loses a logged step, which the restore must redo.
        _maybe_inject_fault(config, position, run.rank)
        if _mid_epoch_evaluation_due(config, position, run.steps_per_epoch):
            _mid_epoch_evaluation(run)
        if _mid_epoch_checkpoint_due(config, position, run.steps_per_epoch):
            _report(run, {"epoch": position.epoch, "step": step})
        clock.restart()


def _end_epoch(run: _Run, test_shard) -> None:
    """Evaluate (rank 0), log the epoch's metrics and report them with a checkpoint."""
    position = run.position
    metrics = _evaluate(run, test_shard)
    _control_capacity(run, metrics)
    position.epoch, position.batches_done = position.epoch + 1, 0
    metrics |= {
        "epoch": position.epoch,
        "step": position.global_step,
        "train_seconds": position.train_seconds,
        "train_cpu_seconds": position.train_cpu_seconds,
    }
    position.best_accuracy = max(position.best_accuracy, metrics.get("val_accuracy", 0.0))
    metrics["best_val_accuracy"] = position.best_accuracy
    position.history.append(metrics)
    if run.logger is not None:
        run.logger.log(metrics, position.global_step)
        print(_epoch_line(run.config, metrics), flush=True)
    _report(run, metrics)


def _epoch_batches(run: _Run, train_shard, epoch: int, skip: int) -> Iterator[Batch]:
    """An epoch's batches of the shard on the device, after the `skip` a resumed run already
    did. The stream starts now, in a thread (`StartedEarly`), not at the loop's first step."""
    batches = StartedEarly(
        shard_batches(
            train_shard,
            run.config.train.batch_size,
            seed=run.config.train.seed + epoch,
            drop_last=True,
            world=run.world,
            rank=run.rank,
            prefetch_blocks=PREFETCH_BLOCKS,
        )
    )
    return (to_device(b, run.device) for b in limited(batches, run.steps_per_epoch, skip=skip))


def _maybe_inject_fault(config: ExperimentConfig, position: Position, rank: int) -> None:
    """Crash rank 0 once at `train.fail_once_at_step` so tests can watch a run recover.

    Rank 0 only: it holds the step metrics (`MetricLogger`), and a rank that raises flushes them
    on its way out; had another rank crashed first, rank 0 would be killed holding them."""
    if rank != 0 or position.global_step != config.train.fail_once_at_step:
        return
    marker = config.run.storage_path / config.run_name / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected fault at step {position.global_step}")


def _steps_per_epoch(config: ExperimentConfig, train_rows: int, world: int) -> int:
    """The global batches of one part each that every rank takes (`batches_per_epoch`)."""
    full = batches_per_epoch(config.data.task, train_rows, config.train.batch_size, world)
    if full < 1:
        raise DataError(
            f"{train_rows:,} training rows do not fill one batch of {config.train.batch_size} "
            f"rows of one part on each of {world} worker(s): raise data.num_train_examples or "
            "lower train.batch_size"
        )
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


def _evaluate(run: _Run, test_shard) -> dict[str, float]:
    if run.rank != 0:
        return {}
    rows = shard_batches(test_shard, 64, seed=0, drop_last=False)
    batches = limited((to_device(b, run.device) for b in rows), run.config.train.max_eval_batches)
    task = run.config.data.task
    metrics = evaluate(
        run.model,
        batches,
        segment_len=run.config.train.segment_len,
        task_kind=task.kind,
        bit_width=getattr(task, "width", None),
        autocast_dtype=run.autocast,
    )
    return {f"val_{k}": v for k, v in metrics.items()}


def _report(run: _Run, metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 first sends its held metrics to MLflow, so a run
    resumed from this checkpoint finds them there, and attaches the checkpoint."""
    if run.logger is not None:
        run.logger.flush()
    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(
            Path(folder), run.model, run.optimizer, run.scheduler, run.position, run.config
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(model, optimizer, scheduler, init_checkpoint: str | None) -> Position:
    """This run's own last checkpoint (a restart after a crash), else `init_checkpoint` (another
    run's, in the same format), else a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and init_checkpoint is None:
        return Position()
    if checkpoint is None:
        return restore_training(Path(init_checkpoint), model, optimizer, scheduler)
    with checkpoint.as_directory() as folder:
        return restore_training(Path(folder), model, optimizer, scheduler)


def _apply_settings(run: _Run) -> None:
    """The config's learning rate over whatever the restored scheduler held, and the controlled
    memory size, if the controller has moved it. The model was built from this config, so its
    other memory settings are the config's already."""
    set_base_lr(run.optimizer, run.scheduler, run.config.train.lr)
    if run.position.capacity is None and run.config.train.capacity.active:
        start = CapacityController.start(run.config.train.capacity, _memory_size(run))
        run.position.capacity = start.state()
    if run.position.capacity is not None:
        _move_to(run, run.position.capacity["memory_size"])


def _memory_size(run: _Run) -> int:
    return run.config.model.memory.memory_size


def _move_to(run: _Run, memory_size: int) -> None:
    """Every block's memory to `memory_size`, and the config with it: checkpoints (and the model
    logged from the last one) carry the size the weights were trained at."""
    if memory_size != _memory_size(run):
        move_memory(run.model, memory_size=memory_size)
        run.config = apply_overrides(run.config, {"model.memory.memory_size": memory_size})


def _schedule(run: _Run) -> dict[str, float]:
    """The settings in force from this step on: population-based training and the capacity
    controller change them, and params cannot change, so they go to MLflow as metrics."""
    memory = run.config.model.memory
    return {
        "schedule/memory_size": float(memory.memory_size or 0),
        "schedule/forget_threshold": memory.forget_threshold,
        "schedule/lr": run.config.train.lr,
    }


def _mid_epoch_evaluation_due(config: ExperimentConfig, position: Position, steps: int) -> bool:
    every = config.train.capacity.eval_every_steps
    return bool(every) and position.global_step % every == 0 and position.batches_done < steps


def _mid_epoch_evaluation(run: _Run) -> None:
    """Evaluate (rank 0) and let the controller act, between epochs' own evaluations."""
    metrics = _evaluate(run, run.test_shard)
    _control_capacity(run, metrics)
    if run.logger is not None:
        run.logger.log(metrics, run.position.global_step)


def _control_capacity(run: _Run, metrics: dict[str, float]) -> None:
    """Rank 0 decides from its validation loss (probing a smaller size when due); the new size
    reaches every rank by broadcast, so all ranks train the same memory."""
    if run.position.capacity is None:
        return
    new = _decide_capacity(run, metrics) if run.rank == 0 else None
    new = _broadcast_size(run, new)
    if new is not None:
        _move_to(run, new)
        if run.logger is not None:
            run.logger.log(_schedule(run) | {"capacity/memory_size": new}, run.position.global_step)
            run.logger.log_dict(run.position.capacity["changes"], "capacity_events.json")


def _decide_capacity(run: _Run, metrics: dict[str, float]) -> int | None:
    controller = CapacityController.from_state(run.config.train.capacity, run.position.capacity)

    def loss_at(size: int) -> float:
        move_memory(run.model, memory_size=size)
        metrics["val_probe_loss"] = _evaluate(run, run.test_shard)["val_loss"]
        move_memory(run.model, memory_size=controller.memory_size)
        return metrics["val_probe_loss"]

    new = controller.decide(run.position.global_step, metrics["val_loss"], loss_at)
    run.position.capacity = controller.state()
    return new


def _broadcast_size(run: _Run, size: int | None) -> int | None:
    if run.world == 1 or not dist.is_initialized():
        return size
    tensor = torch.tensor([size or 0], device=run.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item()) or None


def _epoch_line(config: ExperimentConfig, metrics: dict[str, float]) -> str:
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") and "_num" not in k}
    return f"[memlab] {config.run_name} epoch {int(metrics['epoch'])}: {shown}"
