"""Recipes: named Python functions that return a complete `ExperimentConfig`.

`memlab train --recipe debug-gru model.memory.memory_size=16` starts from one of these. The debug
recipes are tiny (seconds on a laptop) and exist for every mechanism; `mqar-small` is the
associative-recall problem the sweep and `memlab run` use. `seq2seq-mqar-small` and `debug-encdec`
are the encoder-decoder's: the pairs are encoded into its cross memory, then asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memory_models.encoder_decoder import EncoderDecoderConfig
from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config
from pipelines.data.config import DataConfig, MQARTask, RecallPart, Seq2SeqMQARTask, TextTask
from pipelines.experiment import ExperimentConfig, ScalingSettings, TrainSettings

Recipe = Callable[[], ExperimentConfig]


@dataclass(frozen=True)
class Claim:
    """What a recipe's description promises with its defaults: `metric` (a final metric of
    `memlab train`, e.g. `val_accuracy`) reaches `at_least`. `benchmarks/check_recipes.py`
    trains every claimed recipe and prints whether each claim holds."""

    metric: str
    at_least: float

    def __str__(self) -> str:
        return f"{self.metric} >= {self.at_least:.2f}"


# The debug recipes' recall set: vocabulary 256, so their models also read text as bytes (the
# serving tests and demos send text to them); lengths mixed as Zoology advises.
SMALL_RECALL = MQARTask(
    vocab_size=256,
    parts=(RecallPart(seq_len=32, num_kv_pairs=4), RecallPart(seq_len=64, num_kv_pairs=8)),
    test_parts=(RecallPart(seq_len=64, num_kv_pairs=8), RecallPart(seq_len=128, num_kv_pairs=8)),
)
# mqar-small's: the same lengths, tested on the longer training length and beyond it, with a
# vocabulary of 128. At 256, attention (batch 64, lr 1e-3, full window) sat on MQAR's plateau at
# 0.15 after 1,800 steps; at 128 it crossed by step 900 and held 0.997 (plain loop, one thread,
# benchmarks/README.md). Zoology requires the vocabulary to exceed the longest row.
LEARNABLE_RECALL = MQARTask(
    vocab_size=128,
    parts=SMALL_RECALL.parts,
    test_parts=(RecallPart(seq_len=64, num_kv_pairs=8), RecallPart(seq_len=96, num_kv_pairs=8)),
)


def debug(kind: str) -> ExperimentConfig:
    """A few steps of a tiny model on a tiny recall set: does the mechanism train at all."""
    return ExperimentConfig(
        recipe=f"debug-{kind}",
        model=SequenceModelConfig(
            vocab_size=SMALL_RECALL.vocab_size,
            d_model=32,
            n_layers=2,
            memory=memory_config({"kind": kind, "memory_size": 16}),
        ),
        data=DataConfig(task=SMALL_RECALL, num_train_examples=256, num_test_examples=64, blocks=2),
        train=TrainSettings(
            epochs=1,
            batch_size=16,
            segment_len=32,
            max_steps_per_epoch=4,
            max_eval_batches=2,
            warmup_steps=2,
        ),
        scaling=ScalingSettings(num_workers=2),
    )


def mqar_small(kind: str = "attention") -> ExperimentConfig:
    """The recall problem of the sweep, a few minutes on 2 CPUs: attention with its default window
    of 96 (the longest test row) reaches val_accuracy >= 0.95 (`CLAIMS`); smaller memories show
    how much recall they lose. Batch 64: at 32, MQAR's plateau lasted thousands of steps."""
    return ExperimentConfig(
        recipe="mqar-small",
        model=SequenceModelConfig(
            vocab_size=LEARNABLE_RECALL.vocab_size,
            d_model=64,
            n_layers=2,
            memory=memory_config({"kind": kind, "memory_size": 96}),
        ),
        data=DataConfig(
            task=LEARNABLE_RECALL, num_train_examples=20480, num_test_examples=512, blocks=4
        ),
        train=TrainSettings(
            epochs=4,
            batch_size=64,
            lr=1e-3,
            warmup_steps=50,
            max_eval_batches=8,
            log_every_steps=20,
        ),
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=1.0),
    )


# The main job's problem: four pairs in 32 tokens over 64 symbols. Attention crosses MQAR's phase
# transition here in about 300 steps at lr 1e-3 (at 3e-3 it stalled near 25 % for 800 steps).
DEMO_RECALL = MQARTask(vocab_size=64, parts=(RecallPart(seq_len=32, num_kv_pairs=4),))


def mqar_demo(kind: str = "attention") -> ExperimentConfig:
    """What `memlab run` sweeps: small enough that a trial trains in well under a minute on one
    core, hard enough that a small memory visibly fails to recall."""
    return ExperimentConfig(
        recipe="mqar-demo",
        model=SequenceModelConfig(
            vocab_size=DEMO_RECALL.vocab_size,
            d_model=64,
            n_layers=2,
            memory=memory_config({"kind": kind, "memory_size": 32}),
        ),
        data=DataConfig(task=DEMO_RECALL, num_train_examples=6400, num_test_examples=256, blocks=2),
        train=TrainSettings(
            epochs=3,
            batch_size=32,
            lr=1e-3,
            warmup_steps=20,
            max_eval_batches=4,
            log_every_steps=20,
        ),
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=1.0),
    )


def text_small(kind: str = "gru") -> ExperimentConfig:
    """Byte-level language modelling on the Python standard library, TBPTT in 64-byte segments."""
    return ExperimentConfig(
        recipe="text-small",
        model=SequenceModelConfig(
            vocab_size=256, d_model=64, n_layers=2, memory=memory_config({"kind": kind})
        ),
        data=DataConfig(task=TextTask(stream_len=256, max_bytes=2_000_000), blocks=4),
        train=TrainSettings(epochs=1, batch_size=16, segment_len=64, max_steps_per_epoch=200),
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=1.0),
    )


# MQAR split in two: 4 or 8 pairs are encoded into the cross memory once, then every key is asked.
SEQ2SEQ_RECALL = Seq2SeqMQARTask(vocab_size=256, num_kv_pairs=(4, 8))


def encoder_decoder(
    kind: str, vocab_size: int, d_model: int, memory_size: int | None = None
) -> EncoderDecoderConfig:
    """An encoder-decoder whose decoder blocks use memory `kind` and whose cross memory keeps
    `memory_size` slots (None: every context position)."""
    return EncoderDecoderConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=2,
        memory=memory_config({"kind": kind}),
        cross_memory={"memory_size": memory_size},
    )


def debug_encdec(kind: str = "attention") -> ExperimentConfig:
    """A few steps of a tiny encoder-decoder on tiny seq2seq recall, on two workers."""
    return ExperimentConfig(
        recipe="debug-encdec",
        model=encoder_decoder(kind, SEQ2SEQ_RECALL.vocab_size, d_model=32, memory_size=8),
        data=DataConfig(
            task=SEQ2SEQ_RECALL, num_train_examples=256, num_test_examples=64, blocks=2
        ),
        train=TrainSettings(
            epochs=1, batch_size=16, max_steps_per_epoch=4, max_eval_batches=2, warmup_steps=2
        ),
        scaling=ScalingSettings(num_workers=2),
    )


def seq2seq_mqar_small(kind: str = "attention") -> ExperimentConfig:
    """Encoder-decoder recall on one CPU worker: encode the pairs once, answer every key."""
    return ExperimentConfig(
        recipe="seq2seq-mqar-small",
        model=encoder_decoder(kind, SEQ2SEQ_RECALL.vocab_size, d_model=64),
        data=DataConfig(
            task=SEQ2SEQ_RECALL, num_train_examples=16384, num_test_examples=512, blocks=4
        ),
        train=TrainSettings(epochs=2, batch_size=64, lr=3e-3, warmup_steps=50, max_eval_batches=8),
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=1.0),
    )


def _recipes() -> dict[str, Recipe]:
    table: dict[str, Recipe] = {f"debug-{kind}": (lambda k=kind: debug(k)) for kind in REGISTRY}
    table["mqar-small"] = mqar_small
    table["mqar-demo"] = mqar_demo
    table["text-small"] = text_small
    table["debug-encdec"] = debug_encdec
    table["seq2seq-mqar-small"] = seq2seq_mqar_small
    return table


RECIPES: dict[str, Recipe] = _recipes()
# The recipes whose descriptions state an accuracy, with their default mechanism; the debug
# recipes only check that a mechanism trains at all, and text-small claims no number.
CLAIMS: dict[str, Claim] = {
    "mqar-demo": Claim("val_accuracy", 0.95),
    "mqar-small": Claim("val_accuracy", 0.95),
    "seq2seq-mqar-small": Claim("val_accuracy", 0.99),
}


def recipe(name: str) -> ExperimentConfig:
    try:
        return RECIPES[name]()
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ValueError(f"unknown recipe {name!r}; known recipes: {known}") from None
