"""Capacity that moves during training: fixed small, fixed large, the loss controller and PBT.

The task is associative recall (Zoology's MQAR, `pipelines.data.tasks`) and the mechanism sliding-
window attention, whose window (`memory_size`) is shape-free: the same weights run with any window,
and a window shorter than the distance from a key to its query cannot recall it. Each run trains
the same tiny model with the plain loop (`pipelines.train.loop`, no Ray, fresh batch per step):

- `fixed small` / `fixed large`: the window stays at `--small` / `--large` tokens;
- `controller from small` / `from large`: starts at `--small` / `--large`;
  `pipelines.train.capacity.CapacityController` grows the window when the validation loss stalls
  and shrinks it when a probe at half the size costs less than the tolerance, evaluating every
  `--eval-every` steps on a validation set of its own;
- `pbt` (with `--pbt`): `memlab tune --scheduler pbt` through Ray Tune and Ray Train on the same
  task, a population of `--pbt-trials` trials starting at the two sizes, mutating the window
  among the sizes and the learning rate every epoch.

Accuracy is measured on a held-out set the controller never sees. Compute is optimizer steps
summed over trials, plus the controller's extra probe evaluations (forward passes only). No timed
assertions: numbers depend on the machine. Writes `results/bench_capacity.json` and
`results/bench_capacity.png` (the controller's window against step).

Run from the repository root: `.venv/bin/python benchmarks/bench_capacity.py [--quick] [--pbt]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch
from bench_common import (
    RESULTS_DIR,
    format_table,
    log,
    machine_info,
    parse_with_quick,
    write_results,
)

from memory_models.model import SequenceModel, SequenceModelConfig
from memory_models.registry import memory_config
from pipelines.data import tasks
from pipelines.data.config import MQARTask, RecallPart
from pipelines.train.capacity import CapacityController, CapacitySettings, move_memory
from pipelines.train.loop import TrainingModule, evaluate, lr_schedule, train_batch

QUICK = {"steps": 60, "eval_every": 20, "eval_examples": 64, "pbt_epochs": 2, "pbt_steps": 20}
TEST_SEED = 0  # held out: the reported accuracy
VALIDATION_SEED = 1_000_000_007  # the controller's own evaluations
NOTE = (
    "accuracy = share of query tokens whose value is predicted exactly on {eval_examples} "
    "held-out rows after the last step (chance {chance:.3f}). window = attention window "
    "(memory_size) at the end; state B/seq = the KV cache one sequence holds at that window. "
    "steps x trials = optimizer steps summed over the population (PBT trials continue a donor's "
    "step count after an exploit, so each trial still trains every step of its run); probe "
    "evals = the controller's extra validation passes at a smaller window."
)


@dataclasses.dataclass(frozen=True)
class CapacityRow:
    run: str
    accuracy: float
    window: int
    state_bytes_per_sequence: int
    steps: int
    trials: int
    probe_evaluations: int
    cpu_seconds: float
    wall_seconds: float
    schedule: list[tuple[int, int]]  # (step, window) at each change, the start included


def recall_task(args: argparse.Namespace) -> MQARTask:
    part = RecallPart(seq_len=args.seq_len, num_kv_pairs=args.num_kv_pairs)
    return MQARTask(vocab_size=args.vocab_size, parts=(part,))


def as_batch(task: MQARTask, rows: int, seed: int) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(col) for name, col in tasks.generate(task, rows, seed).items()}


def build_model(args: argparse.Namespace, window: int) -> SequenceModel:
    memory = memory_config({"kind": "attention", "memory_size": window})
    config = SequenceModelConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, memory=memory
    )
    return config.build()


def score(model: SequenceModel, rows: dict[str, torch.Tensor]) -> dict[str, float]:
    return evaluate(model, [rows], segment_len=None, task_kind="mqar")


def train_one(
    name: str, args: argparse.Namespace, window: int, controller: CapacityController | None
) -> CapacityRow:
    """One run of `args.steps` steps; the controller, if any, acts at every evaluation."""
    torch.manual_seed(args.seed)
    task = recall_task(args)
    held_out = as_batch(task, args.eval_examples, TEST_SEED)
    validation = as_batch(task, args.eval_examples, VALIDATION_SEED)
    model = build_model(args, window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = lr_schedule(optimizer, args.warmup_steps, args.steps)
    module, schedule, probes = TrainingModule(model), [(0, window)], []
    cpu, wall = time.process_time(), time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = as_batch(task, args.batch_size, args.seed * 1_000_003 + step)
        train_batch(module, batch, optimizer, scheduler, grad_clip=1.0)
        if controller is None or step % args.eval_every:
            continue
        loss_at = _loss_at(model, validation, probes)
        new = controller.decide(step, score(model, validation)["loss"], loss_at)
        if new is not None:
            move_memory(model, memory_size=new)
            schedule.append((step, new))
            log(f"  step {step:5d}  window {schedule[-2][1]} -> {new}")
    final = schedule[-1][1]
    accuracy = score(model, held_out)["accuracy"]
    log(f"  {name}: accuracy {accuracy:.3f} at window {final}")
    return CapacityRow(
        run=name,
        accuracy=accuracy,
        window=final,
        state_bytes_per_sequence=model.state_size_bytes(args.seq_len),
        steps=args.steps,
        trials=1,
        probe_evaluations=len(probes),
        cpu_seconds=time.process_time() - cpu,
        wall_seconds=time.perf_counter() - wall,
        schedule=schedule,
    )


def _loss_at(model: SequenceModel, rows: dict[str, torch.Tensor], probes: list[int]):
    """The probe: the same weights at `size`, then back at the size they were at."""

    def loss_at(size: int) -> float:
        probes.append(size)
        current = model.blocks[0].memory.config.memory_size
        move_memory(model, memory_size=size)
        loss = score(model, rows)["loss"]
        move_memory(model, memory_size=current)
        return loss

    return loss_at


def controller_settings(args: argparse.Namespace) -> CapacitySettings:
    return CapacitySettings(
        policy="loss",
        patience=args.patience,
        max_memory_size=args.large,
        min_memory_size=args.small,
        probe_every=args.probe_every,
        tolerance=args.tolerance,
    )


def run_pbt(args: argparse.Namespace) -> CapacityRow:
    """The same task through `run_sweep(scheduler="pbt")` on a private local Ray cluster."""
    from pipelines.experiment import apply_overrides, outputs_under
    from pipelines.recipes import mqar_demo
    from pipelines.runtime import start_private
    from pipelines.tune.settings import SweepSettings
    from pipelines.tune.sweep import run_sweep

    root = Path(tempfile.mkdtemp(prefix="bench_capacity_"))
    steps = args.pbt_epochs * args.pbt_steps
    base = apply_overrides(
        mqar_demo("attention"),
        {
            "data.task": recall_task(args).model_dump(mode="json"),
            "data.num_train_examples": args.pbt_steps * args.batch_size,
            "data.num_test_examples": args.eval_examples,
            "train.epochs": args.pbt_epochs,
            "train.batch_size": args.batch_size,
            "train.warmup_steps": args.warmup_steps,
            "train.max_eval_batches": None,
            "scaling.cpus_per_worker": 0.5,
            **outputs_under(root),
        },
    )
    space = {
        "model.memory.memory_size": {"grid": [args.small, args.large]},
        "train.lr": {"loguniform": [args.lr / 3, args.lr * 3]},
    }
    start_private(log_to_driver=False)
    cpu, wall = time.process_time(), time.perf_counter()
    settings = SweepSettings(name="bench-pbt", scheduler="pbt", storage_path=root / "tune")
    outcome = run_sweep(base, space, settings, callbacks=[])
    best = outcome.table.sort_values("val_accuracy", ascending=False).iloc[0]
    final = apply_overrides(base, {"model.memory.memory_size": int(best["memory_size"])})
    log(f"  pbt: best trial {best['trial']} window {best['memory_size']} in {root}")
    return CapacityRow(
        run="pbt (best trial)",
        accuracy=float(best["val_accuracy"]),
        window=int(best["memory_size"]),
        state_bytes_per_sequence=final.state_bytes_per_sequence(),
        steps=steps,
        trials=len(outcome.table),
        probe_evaluations=0,
        cpu_seconds=time.process_time() - cpu,
        wall_seconds=time.perf_counter() - wall,
        schedule=[],
    )


def plot(rows: list[CapacityRow], steps: int, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for row in rows:
        points = [*row.schedule, (steps, row.schedule[-1][1])]
        xs, ys = [s for s, _ in points], [w for _, w in points]
        axis.step(xs, ys, where="post", marker="o", label=row.run)
    axis.legend()
    axis.set(xlabel="optimizer step", ylabel="attention window (memory_size)")
    axis.set_yscale("log", base=2)
    axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_title("loss controller: capacity against step")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def table(rows: list[CapacityRow]) -> str:
    headers = ["run", "accuracy", "window", "state B/seq", "steps x trials", "probe evals"]
    headers += ["cpu s", "wall s"]
    cells = [
        [
            row.run,
            f"{row.accuracy:.3f}",
            str(row.window),
            f"{row.state_bytes_per_sequence:,}",
            f"{row.steps} x {row.trials} = {row.steps * row.trials}",
            str(row.probe_evaluations),
            f"{row.cpu_seconds:.1f}",
            f"{row.wall_seconds:.1f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-kv-pairs", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=25, help="controller evaluations")
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--small", type=int, default=4, help="the small window (and the minimum)")
    parser.add_argument("--large", type=int, default=32, help="the large window (and the maximum)")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--pbt", action="store_true", help="also run PBT through Ray Tune")
    parser.add_argument("--pbt-only", action="store_true", help="only the PBT run")
    parser.add_argument("--pbt-epochs", type=int, default=3)
    parser.add_argument("--pbt-steps", type=int, default=200, help="steps per PBT epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = controller_settings(args)
    runs = {
        "fixed small": (args.small, None),
        "fixed large": (args.large, None),
        "controller from small": (args.small, CapacityController.start(settings, args.small)),
        "controller from large": (args.large, CapacityController.start(settings, args.large)),
    }
    chosen = [] if args.pbt_only else list(runs)
    rows = []
    for index, name in enumerate(chosen, start=1):
        log(f"[{index}/{len(chosen)}] {name}")
        rows.append(train_one(name, args, *runs[name]))
    if args.pbt or args.pbt_only:
        log("[pbt]")
        rows.append(run_pbt(args))
    print(table(rows))
    suffix = ("_quick" if args.quick else "") + ("_pbt" if args.pbt_only else "")
    controlled = [row for row in rows if row.run.startswith("controller")]
    if controlled:
        figure = plot(controlled, args.steps, RESULTS_DIR / f"bench_capacity{suffix}.png")
        log(f"wrote {figure}")
    chance = 1.0 / (args.vocab_size - args.vocab_size // 2)
    sizes = {k: v for k, v in vars(args).items() if k != "quick"}
    note = NOTE.format(eval_examples=args.eval_examples, chance=chance)
    write_results(f"bench_capacity{suffix}.json", machine_info(), sizes, rows, note)


if __name__ == "__main__":
    sys.exit(main())
