"""Encode once, then recall: encoder-decoder attention on seq2seq MQAR against decoder-only models.

The encoder-decoder (`memory_models.encoder_decoder`, decoder self-memory `--decoder-kind`) trains
on sequence-to-sequence MQAR (`pipelines.data.tasks.seq2seq_mqar`): the context holds k key-value
pairs, the decoder asks for every key once. The decoder-only mechanisms (`--kinds`) train on the
same rows concatenated (`seq2seq.as_decoder_only`: context, then the questions), which is
Zoology's MQAR at seq_len 4k with a query at every slot after the context: the same questions
about the same pairs, with the pairs read as part of the stream instead of encoded into memory.
`--memory-sizes` adds encoder-decoder rows with the cross memory pooled to that many slots
(`none` keeps every context position).

Every model trains with the plain loop of `pipelines.train.loop` (no Ray, one process, `--threads`
torch threads) on a fresh batch per step, is scored on a fixed held-out set every `--eval-every`
steps, and stops at `--target` accuracy, after `--steps` steps or after `--budget-s` CPU seconds.

Run from the repository root: `.venv/bin/python benchmarks/bench_encdec_learning.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from bench_common import from_args, log, parse_with_quick, run_each
from bench_learning import (
    TEST_SEED,
    LearningRow,
    Limits,
    Log,
    add_learning_options,
    as_tensors,
    learning_curve,
    learning_row,
    report,
    training_batches,
)

from memory_models.architectures import model_config
from memory_models.registry import REGISTRY
from pipelines.data import tasks
from pipelines.data.config import Seq2SeqMQARTask
from pipelines.data.tasks.seq2seq import as_decoder_only

QUICK = {"steps": 40, "eval_every": 20, "eval_examples": 64, "budget_s": 20.0}
NOTE = (
    "accuracy = share of questions (one per key) whose value is predicted exactly, on "
    "{eval_examples} held-out rows, at the last evaluation; chance = 1 / {values} possible "
    "values, and the plateau before recall is near 1 / {pairs} (one of the row's values, not the "
    "right one). encdec rows read the pairs through the cross memory (slots = its memory_size; "
    "all = every context position); the others read context ++ questions as one stream. "
    "state B/seq = bytes one sequence holds after the row (the encdec's cross memory included). "
    "cpu s = process CPU time with {threads} torch thread(s); wall s can be longer on a shared "
    "machine. to target = steps to the first evaluation at or above {target:.0%}."
)


@dataclasses.dataclass(frozen=True)
class Settings(Limits):
    vocab_size: int
    num_kv_pairs: int


@dataclasses.dataclass(frozen=True)
class Contender:
    """One row of the table: an architecture, its memory kind and (encdec) cross memory size."""

    label: str
    architecture: str
    kind: str
    memory_size: int | None = None

    def config(self, settings: Settings) -> dict:
        data = {
            "architecture": self.architecture,
            "vocab_size": settings.vocab_size,
            "d_model": settings.d_model,
            "n_layers": settings.n_layers,
            "memory": {"kind": self.kind},
        }
        if self.architecture == "encoder_decoder":
            data["cross_memory"] = {"memory_size": self.memory_size}
        return data

    def rows(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.architecture != "encoder_decoder":
            batch = as_decoder_only(batch)
        return as_tensors(batch)


def recall_task(settings: Settings) -> Seq2SeqMQARTask:
    return Seq2SeqMQARTask(vocab_size=settings.vocab_size, num_kv_pairs=(settings.num_kv_pairs,))


def learn(contender: Contender, settings: Settings, log: Log) -> LearningRow:
    """Train one contender until the target accuracy, the step limit or the CPU budget."""
    torch.manual_seed(settings.seed)
    task = recall_task(settings)
    held_out = contender.rows(tasks.generate(task, settings.eval_examples, TEST_SEED))
    model = model_config(contender.config(settings)).build()
    batches = training_batches(task, settings, contender.rows)
    curve, state_bytes = learning_curve(
        model, batches, held_out, "seq2seq_mqar", settings, "cosine", log
    )
    chance = 1.0 / (settings.vocab_size - settings.vocab_size // 2)
    return learning_row(contender.label, model, settings, curve, chance, state_bytes)


def contenders(args: argparse.Namespace) -> list[Contender]:
    out = []
    for size in args.memory_sizes:
        slots = None if size == "none" else int(size)
        label = f"encdec {args.decoder_kind}, slots {'all' if slots is None else slots}"
        out.append(Contender(label, "encoder_decoder", args.decoder_kind, slots))
    return out + [Contender(kind, "decoder_only", kind) for kind in args.kinds]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--num-kv-pairs", type=int, default=8)
    add_learning_options(parser, steps=2000, budget_s=120.0, output="encdec_learning.json")
    parser.add_argument("--decoder-kind", default="attention", choices=list(REGISTRY))
    parser.add_argument(
        "--memory-sizes",
        nargs="+",
        default=["none"],
        help="cross memory slots of the encdec rows: integers, or none for every position",
    )
    parser.add_argument("--kinds", nargs="*", default=["attention", "gru"], choices=list(REGISTRY))
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = from_args(Settings, args)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {settings}")
    todo = contenders(args)
    rows = run_each(todo, lambda contender: learn(contender, settings, log), lambda c: c.label)
    note = NOTE.format(
        eval_examples=settings.eval_examples,
        values=settings.vocab_size - settings.vocab_size // 2,
        pairs=settings.num_kv_pairs,
        threads=args.threads,
        target=settings.target,
    )
    contenders_data = [dataclasses.asdict(c) for c in todo]
    report(rows, note, settings, args.output, contenders=contenders_data)


if __name__ == "__main__":
    main(sys.argv[1:])
