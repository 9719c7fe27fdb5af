"""What should a bounded attention cache keep? The eviction frontier on MQAR and forgetting-MQAR.

Full attention is trained on each task with the plain loop of `pipelines.train.loop` (as
`bench_learning.py` trains). The same weights are then scored with every eviction policy of
`memory_models.attention` (window, sinks, threshold, h2o, tova) at cache budgets of 1/8, 1/4 and
1/2 of the row, beside the full cache and beside DeltaNet and GLA trained on the same task. Every
memory is chunk invariant, so a whole-row score is the score a served session gets; each row of
the table also gives the largest difference between the whole-row logits and the logits of the
same rows read one token per call, to show it. Cost per token: one token for one sequence, as a
server steps a session, in milliseconds (median of repeats).

Last, training through the memory's own forgetting: the best policy at 1/4 of the row trains a
fresh model with eviction on, against the full-cache model with that policy applied only after
training.

Run from the repository root: `.venv/bin/python benchmarks/bench_eviction.py [--quick]`; the
table, a JSON file and `eviction_frontier.png` go to `--out` (default `benchmarks/results/`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from bench_common import (
    format_table,
    from_args,
    log,
    machine_info,
    parse_with_quick,
    write_json,
)
from bench_learning import (
    Limits,
    Tensors,
    add_learning_options,
    as_tensors,
    learning_curve,
    score,
    training_batches,
)

from memory_models.attention import sinks_for
from memory_models.model import SequenceModel, SequenceModelConfig
from memory_models.registry import memory_config
from pipelines.data import tasks
from pipelines.data.config import ForgettingMQARTask, MQARTask, RecallPart

POLICIES = ("window", "sinks", "threshold", "h2o", "tova")
FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
FIXED_STATE = ({"kind": "deltanet", "conv_size": 4}, {"kind": "gla", "conv_size": 4})
TEST_SEED = 0
QUICK = {"steps": 30, "eval_every": 30, "eval_examples": 32, "budget_s": 30.0, "cost_tokens": 16}


@dataclasses.dataclass(frozen=True)
class Settings(Limits):
    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    num_updates: int
    cost_tokens: int
    forgetting_lr: float


@dataclasses.dataclass(frozen=True)
class FrontierRow:
    task: str
    memory: str  # "attention full", "attention tova 1/4", "deltanet", ...
    policy: str
    budget: int | None  # cache entries; None for the full cache and the fixed-state kinds
    state_bytes: int
    accuracy: float
    served_gap: float  # max |whole-row logits - token-by-token logits| on a few rows
    ms_per_token: float


def make_tasks(settings: Settings) -> dict[str, MQARTask]:
    part = RecallPart(seq_len=settings.seq_len, num_kv_pairs=settings.num_kv_pairs)
    return {
        "mqar": MQARTask(vocab_size=settings.vocab_size, parts=(part,)),
        "forgetting_mqar": ForgettingMQARTask(
            vocab_size=settings.vocab_size, parts=(part,), num_updates=settings.num_updates
        ),
    }


def build(memory: dict[str, Any], settings: Settings) -> SequenceModel:
    config = SequenceModelConfig(
        vocab_size=settings.vocab_size,
        d_model=settings.d_model,
        n_layers=settings.n_layers,
        memory=memory_config(memory),
    )
    return config.build()


def train(memory: dict[str, Any], task: MQARTask, held_out: Tensors, settings: Settings):
    if task.kind == "forgetting_mqar":
        settings = dataclasses.replace(settings, lr=settings.forgetting_lr)
    torch.manual_seed(settings.seed)
    model = build(memory, settings)
    curve, _ = learning_curve(
        model, training_batches(task, settings), held_out, task.kind, settings, "cosine", log
    )
    return model, curve


def with_memory(model: SequenceModel, memory: dict[str, Any], settings: Settings) -> SequenceModel:
    """The same weights under another memory config of the same kind (eviction sizes nothing)."""
    other = build(memory, settings)
    other.load_state_dict(model.state_dict())
    return other.eval()


@torch.inference_mode()
def served_gap(model: SequenceModel, held_out: Tensors, rows: int = 4) -> float:
    """Largest |logit difference| between reading rows whole and one token per call."""
    inputs = held_out["inputs"][:rows]
    whole, _ = model(inputs)
    state, steps = None, []
    for t in range(inputs.shape[1]):
        logits, state = model(inputs[:, t : t + 1], state)
        steps.append(logits)
    return (whole - torch.cat(steps, dim=1)).abs().max().item()


@torch.inference_mode()
def ms_per_token(model: SequenceModel, held_out: Tensors, tokens: int) -> float:
    """A session stepped one token per call: median milliseconds per token over 3 runs."""
    stream = held_out["inputs"].flatten()[:tokens][None]
    times = []
    for _ in range(3):
        state, start = None, time.perf_counter()
        for t in range(stream.shape[1]):
            _, state = model(stream[:, t : t + 1], state)
        times.append((time.perf_counter() - start) / stream.shape[1])
    return 1000 * sorted(times)[1]


@torch.inference_mode()
def state_bytes(model: SequenceModel, held_out: Tensors) -> int:
    _, state = model(held_out["inputs"][:1])
    return state.nbytes_per_sequence()


def measure(
    task_name: str, label: str, policy: str, budget: int | None, model, held_out, settings
) -> FrontierRow:
    accuracy = score(model.eval(), held_out, "mqar")["accuracy"]
    row = FrontierRow(
        task=task_name,
        memory=label,
        policy=policy,
        budget=budget,
        state_bytes=state_bytes(model, held_out),
        accuracy=accuracy,
        served_gap=served_gap(model, held_out),
        ms_per_token=ms_per_token(model, held_out, settings.cost_tokens),
    )
    log(
        f"  {task_name:15s} {label:24s} {row.state_bytes:8,d} B  accuracy {accuracy:.3f}  "
        f"gap {row.served_gap:.1e}  {row.ms_per_token:.2f} ms/token"
    )
    return row


def frontier(task_name: str, task: MQARTask, settings: Settings) -> list[FrontierRow]:
    """Full attention trained once, scored under every policy and budget; the fixed-state kinds
    trained beside it."""
    held_out = as_tensors(tasks.generate(task, settings.eval_examples, TEST_SEED))
    log(f"{task_name}: training full attention")
    full, _ = train({"kind": "attention"}, task, held_out, settings)
    rows = [measure(task_name, "attention full", "full", None, full, held_out, settings)]
    for policy in POLICIES:
        for fraction in FRACTIONS:
            budget = round(settings.seq_len * fraction)
            memory = {"kind": "attention", "memory_size": budget, "eviction": policy}
            if policy == "sinks":
                memory["sinks"] = sinks_for(budget)
            model = with_memory(full, memory, settings)
            label = f"attention {policy} {budget}"
            rows.append(measure(task_name, label, policy, budget, model, held_out, settings))
    for memory in FIXED_STATE:
        log(f"{task_name}: training {memory['kind']}")
        model, _ = train(memory, task, held_out, settings)
        rows.append(measure(task_name, memory["kind"], "fixed", None, model, held_out, settings))
    return rows


def trained_with_eviction(rows: list[FrontierRow], settings: Settings) -> list[FrontierRow]:
    """The best policy at 1/4 of the row on MQAR, trained with its eviction on from scratch."""
    quarter = round(settings.seq_len / 4)
    candidates = [r for r in rows if r.task == "mqar" and r.budget == quarter]
    best = max(candidates, key=lambda r: r.accuracy)
    task = make_tasks(settings)["mqar"]
    held_out = as_tensors(tasks.generate(task, settings.eval_examples, TEST_SEED))
    memory = {"kind": "attention", "memory_size": quarter, "eviction": best.policy}
    log(f"mqar: training attention with {best.policy} eviction at {quarter} entries")
    model, _ = train(memory, task, held_out, settings)
    label = f"attention {best.policy} {quarter} (trained with it)"
    return [best, measure("mqar", label, best.policy, quarter, model, held_out, settings)]


def table(rows: list[FrontierRow], full: dict[str, float]) -> str:
    headers = ["task", "memory", "state B", "accuracy", "of full", "served gap", "ms/token"]
    body = [
        [
            r.task,
            r.memory,
            f"{r.state_bytes:,}",
            f"{r.accuracy:.3f}",
            f"{r.accuracy / max(full[r.task], 1e-9):.2f}",
            f"{r.served_gap:.0e}",
            f"{r.ms_per_token:.2f}",
        ]
        for r in rows
    ]
    return format_table(headers, body, left=2)


def plot(rows: list[FrontierRow], path: Path) -> None:
    task_names = sorted({r.task for r in rows}, key=["mqar", "forgetting_mqar"].index)
    figure, axes = plt.subplots(1, len(task_names), figsize=(6 * len(task_names), 4.5))
    for axis, task_name in zip(axes, task_names, strict=True):
        mine = [r for r in rows if r.task == task_name]
        for policy in POLICIES:
            points = sorted((r.state_bytes, r.accuracy) for r in mine if r.policy == policy)
            axis.plot(*zip(*points, strict=True), marker="o", label=policy)
        for r in mine:
            if r.policy in ("full", "fixed"):
                axis.scatter(r.state_bytes, r.accuracy, marker="*", s=120, color="black", zorder=3)
                axis.annotate(r.memory, (r.state_bytes, r.accuracy), fontsize=8)
        axis.set_xscale("log")
        axis.set(xlabel="state bytes per sequence", ylabel="accuracy", title=task_name)
        axis.grid(alpha=0.3)
    axes[0].legend(title="eviction (budgets 1/8, 1/4, 1/2 of the row)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-kv-pairs", type=int, default=4)
    parser.add_argument("--num-updates", type=int, default=2)
    parser.add_argument("--cost-tokens", type=int, default=128, help="tokens timed per policy")
    parser.add_argument(
        "--forgetting-lr",
        type=float,
        default=1e-3,
        help="learning rate on forgetting-MQAR (attention stays on its plateau at 3e-3)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table and PNG here")
    add_learning_options(parser, steps=2000, budget_s=900.0, output="eviction.json")
    parser.set_defaults(target=0.99)
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = from_args(Settings, args)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {settings}")
    rows = []
    for task_name, task in make_tasks(settings).items():
        rows += frontier(task_name, task, settings)
    through = trained_with_eviction(rows, settings)
    full = {r.task: r.accuracy for r in rows if r.policy == "full"}
    text = table(rows, full) + "\n\ntraining through forgetting (mqar):\n" + table(through, full)
    log("\n" + text)
    payload = {
        "machine": machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "settings": dataclasses.asdict(settings),
        "frontier": [dataclasses.asdict(r) for r in rows],
        "trained_with_eviction": [dataclasses.asdict(r) for r in through],
    }
    path = write_json(args.output, payload)
    out = args.out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "eviction.txt").write_text(text + "\n")
    plot(rows, out / "eviction_frontier.png")
    log(f"wrote {path}, {out / 'eviction.txt'} and {out / 'eviction_frontier.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
