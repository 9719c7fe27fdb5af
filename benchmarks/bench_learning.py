"""Does every memory mechanism learn associative recall? MQAR accuracy within a CPU budget.

Each mechanism in `memory_models.registry` trains the same tiny model (embedding, `n_layers`
blocks, tied head; the mechanism's default memory config) on a small multi-query associative
recall task (Zoology's MQAR, `pipelines.data.tasks`) with the plain loop of
`pipelines.train.loop`: no Ray, one process, `--threads` torch threads. Every step draws a fresh
batch, so the model cannot memorise rows and must learn to recall. A fixed held-out set is scored
every `--eval-every` steps; a mechanism stops at `--target` accuracy, after `--steps` steps or
when its `--budget-s` CPU seconds are spent, whichever comes first.

Chance is 1 / (number of possible values): MQAR values come from the upper half of the vocabulary.

MQAR has a phase transition: accuracy sits near 1 / num_kv_pairs (the model copies one of the
values in the row, but not the right one) until an induction-like circuit forms, then jumps. The
batch size decides how soon: attention with the defaults (batch 64, lr 3e-3) crossed it in about
200 steps (~13 CPU seconds), with batch 32 it took 2,400 steps or more and lr 1e-2 never crossed
in 1,500. benchmarks/README.md lists the settings tried.

Run from the repository root: `.venv/bin/python benchmarks/bench_learning.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from bench_common import (
    format_table,
    from_args,
    log,
    machine_info,
    parse_with_quick,
    run_each,
    write_json,
)

from memory_models.architectures import TokenModel
from memory_models.model import SequenceModel, SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config
from pipelines.data import tasks
from pipelines.data.config import MQARTask, RecallPart
from pipelines.train.loop import TrainingModule, evaluate, lr_schedule, train_batch

# A smoke run of every code path in seconds; it is not expected to get past the plateau.
QUICK = {"steps": 40, "eval_every": 20, "eval_examples": 64, "budget_s": 20.0}
TEST_SEED = 0  # the held-out set; training batches use seeds from 1 upwards
NOTE = (
    "accuracy = share of query tokens whose value is predicted exactly, on {eval_examples} "
    "held-out rows, at the last evaluation. chance = 1 / {values} possible values; the plateau "
    "before recall is near 1 / {pairs} key-value pairs (one of the row's values, not the right "
    "one), so accuracy near {plateau:.2f} is not recall yet. cpu s = "
    "process CPU time of training and the periodic evaluations with {threads} torch thread(s), "
    "which the budget counts: on a shared machine wall time (wall s) can be several times "
    "longer. to target = steps to the first evaluation at or above {target:.0%}."
)

Log = Callable[[str], None]
Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Limits:
    """The settings every learning benchmark has (`add_learning_options`): the model's size and
    the limits of the shared loop (`learning_curve`); a benchmark's `Settings` adds its task's."""

    d_model: int
    n_layers: int
    batch_size: int
    lr: float
    warmup_steps: int
    steps: int
    eval_every: int
    eval_examples: int
    target: float
    budget_s: float
    seed: int


@dataclasses.dataclass(frozen=True)
class Settings(Limits):
    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    schedule: str
    conv_size: int | None


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    step: int
    cpu_seconds: float
    wall_seconds: float
    accuracy: float
    loss: float


@dataclasses.dataclass(frozen=True)
class LearningRow:
    kind: str
    accuracy: float
    best_accuracy: float
    chance: float
    steps: int
    cpu_seconds: float
    wall_seconds: float
    steps_to_target: int | None
    cpu_seconds_to_target: float | None
    stopped_by: str  # "target", "steps" or "budget"
    parameters: int
    state_bytes_per_sequence: int
    curve: list[CurvePoint]


def recall_task(settings: Settings) -> MQARTask:
    part = RecallPart(seq_len=settings.seq_len, num_kv_pairs=settings.num_kv_pairs)
    return MQARTask(vocab_size=settings.vocab_size, parts=(part,))


def chance(task: MQARTask) -> float:
    """Values are drawn from [V/2, V): a guess among them is right this often."""
    return 1.0 / (task.vocab_size - task.vocab_size // 2)


def build_model(kind: str, settings: Settings) -> SequenceModel:
    config = SequenceModelConfig(
        vocab_size=settings.vocab_size,
        d_model=settings.d_model,
        n_layers=settings.n_layers,
        memory=memory_config({"kind": kind, **short_conv(kind, settings.conv_size)}),
    )
    return config.build()


def short_conv(kind: str, conv_size: int | None) -> dict[str, int]:
    """`conv_size` for the kinds that take one (`memory_models.short_conv`; Mamba's own too)."""
    takes_it = "conv_size" in REGISTRY[kind].model_fields
    return {"conv_size": conv_size} if takes_it and conv_size is not None else {}


def as_tensors(batch: dict[str, Any]) -> Tensors:
    return {name: torch.as_tensor(column) for name, column in batch.items()}


def training_batches(
    task: Any, settings: Limits, to_tensors: Callable[[dict], Tensors] = as_tensors
) -> Iterator[Tensors]:
    """A fresh batch per step, seeded by the step: every run sees the same stream."""
    for step in range(settings.steps):
        seed = settings.seed * 1_000_003 + 1 + step
        yield to_tensors(tasks.generate(task, settings.batch_size, seed))


def score(model: TokenModel, held_out: Tensors, task_kind: str) -> dict[str, float]:
    rows = held_out["inputs"].shape[0]
    chunks = [{k: v[i : i + 256] for k, v in held_out.items()} for i in range(0, rows, 256)]
    return evaluate(model, chunks, segment_len=None, task_kind=task_kind)


def learn(kind: str, settings: Settings, log: Log) -> LearningRow:
    """Train `kind` until the target accuracy, the step limit or the CPU budget."""
    torch.manual_seed(settings.seed)
    task = recall_task(settings)
    held_out = as_tensors(tasks.generate(task, settings.eval_examples, TEST_SEED))
    model = build_model(kind, settings)
    curve, state_bytes = learning_curve(
        model, training_batches(task, settings), held_out, "mqar", settings, settings.schedule, log
    )
    return learning_row(kind, model, settings, curve, chance(task), state_bytes)


def learning_curve(
    model: TokenModel,
    batches: Iterable[Tensors],
    held_out: Tensors,
    task_kind: str,
    settings: Limits,
    schedule: str,
    log: Log,
) -> tuple[list[CurvePoint], int]:
    """Train `model` on `batches` (one per step, AdamW with warmup and `schedule`), scoring
    `held_out` every `eval_every` steps, until the target accuracy, the step limit or the CPU
    budget. Returns the evaluations and the state bytes per sequence of the last step."""
    module = TrainingModule(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=0.01)
    scheduler = lr_schedule(optimizer, settings.warmup_steps, settings.steps, schedule)
    curve: list[CurvePoint] = []
    clock = Clock()
    for step, batch in enumerate(batches, start=1):
        result = train_batch(module, batch, optimizer, scheduler, segment_len=None, grad_clip=1.0)
        # The budget is checked every step: a slow mechanism must not overrun it by eval_every.
        over_budget = clock.cpu() >= settings.budget_s
        if step % settings.eval_every and step != settings.steps and not over_budget:
            continue
        curve.append(_point(step, score(model, held_out, task_kind), clock, log))
        if curve[-1].accuracy >= settings.target or over_budget:
            break
    return curve, result.state_bytes_per_sequence


class Clock:
    """CPU time of this process (what the budget counts) and wall time, since creation."""

    def __init__(self) -> None:
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()

    def cpu(self) -> float:
        return time.process_time() - self.cpu_start

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start


def _point(step: int, metrics: dict[str, float], clock: Clock, log: Log) -> CurvePoint:
    point = CurvePoint(step, clock.cpu(), clock.wall(), metrics["accuracy"], metrics["loss"])
    log(
        f"  step {step:5d}  cpu {point.cpu_seconds:6.1f} s  wall {point.wall_seconds:6.1f} s  "
        f"loss {point.loss:.3f}  accuracy {point.accuracy:.3f}"
    )
    return point


def _stop_reason(point: CurvePoint, settings: Limits) -> str:
    if point.accuracy >= settings.target:
        return "target"
    if point.cpu_seconds >= settings.budget_s:
        return "budget"
    return "steps"


def learning_row(
    kind: str,
    model: TokenModel,
    settings: Limits,
    curve: list[CurvePoint],
    chance: float,
    state_bytes: int,
) -> LearningRow:
    """The table row of one trained model: where its curve ended, and when it reached target."""
    reached = next((p for p in curve if p.accuracy >= settings.target), None)
    return LearningRow(
        kind=kind,
        accuracy=curve[-1].accuracy,
        best_accuracy=max(p.accuracy for p in curve),
        chance=chance,
        steps=curve[-1].step,
        cpu_seconds=curve[-1].cpu_seconds,
        wall_seconds=curve[-1].wall_seconds,
        steps_to_target=reached.step if reached else None,
        cpu_seconds_to_target=reached.cpu_seconds if reached else None,
        stopped_by=_stop_reason(curve[-1], settings),
        parameters=model.num_parameters(),
        state_bytes_per_sequence=state_bytes,
        curve=curve,
    )


def table(rows: list[LearningRow]) -> str:
    headers = ["mechanism", "accuracy", "chance", "x chance", "steps", "cpu s", "wall s"]
    headers += ["to target", "stopped by", "params", "state B/seq"]
    cells = [
        [
            row.kind,
            f"{row.accuracy:.3f}",
            f"{row.chance:.3f}",
            f"{row.accuracy / row.chance:.1f}",
            str(row.steps),
            f"{row.cpu_seconds:.1f}",
            f"{row.wall_seconds:.1f}",
            "-" if row.steps_to_target is None else f"{row.steps_to_target} st",
            row.stopped_by,
            f"{row.parameters:,}",
            f"{row.state_bytes_per_sequence:,}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-kv-pairs", type=int, default=4)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument(
        "--conv-size",
        type=int,
        default=None,
        help="short convolution taps for the kinds that take one (default: each kind's own)",
    )
    add_learning_options(parser, steps=3000, budget_s=90.0, output="learning.json")
    parser.add_argument("--kinds", nargs="+", choices=list(REGISTRY), help="default: all")
    return parse_with_quick(parser, argv, QUICK)


def add_learning_options(
    parser: argparse.ArgumentParser, *, steps: int, budget_s: float, output: str
) -> None:
    """The options of `Limits`, the threads, `--quick` and the results file: the options every
    learning benchmark has."""
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=steps, help="most training steps")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=512, help="held-out rows")
    parser.add_argument("--target", type=float, default=0.95, help="stop at this accuracy")
    parser.add_argument(
        "--budget-s", type=float, default=budget_s, help="CPU seconds per model (process time)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a few steps, for a smoke run")
    parser.add_argument("--output", default=output, help="file in benchmarks/results/")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = from_args(Settings, args)
    kinds = args.kinds or list(REGISTRY)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {settings}")
    rows = run_each(kinds, lambda kind: learn(kind, settings, log))
    values = settings.vocab_size - settings.vocab_size // 2
    note = NOTE.format(
        eval_examples=settings.eval_examples,
        values=values,
        pairs=settings.num_kv_pairs,
        plateau=1 / settings.num_kv_pairs,
        threads=args.threads,
        target=settings.target,
    )
    report(rows, note, settings, args.output)


def report(rows: list[LearningRow], note: str, settings: Any, output: str, **extra: Any) -> None:
    """Log the table and its note, and write them with the machine and `settings` to `output`
    in benchmarks/results/ (`extra` entries go after the settings)."""
    log("")
    log(table(rows))
    log(textwrap.fill(note, width=100))
    payload = {
        "machine": machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "settings": dataclasses.asdict(settings),
        **extra,
        "note": note,
        "results": [dataclasses.asdict(row) for row in rows],
    }
    log(f"wrote {write_json(output, payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
