"""Typed, frozen settings for data preparation: one task config per `kind`, one DataConfig on top.

Configs only hold and check values; the generators in `tasks/` and `text.py` read them.
Checks are explicit (`check()`) rather than pydantic constraints so that every impossible setting
raises a `DataError` that names the parameter and the fix, before any Ray work starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.data.errors import DataError

# Zoology's vocabulary for MQAR (every config under zoology/experiments/paper_configs/).
ZOOLOGY_VOCAB = 8192


class Strict(BaseModel):
    """Frozen and strict: a typo in a key fails at once instead of being ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(message)


class RecallPart(Strict):
    """One part of an associative-recall mixture: rows of `seq_len` with `num_kv_pairs`.

    `weight` is the part's share of the split's rows (relative to the other parts' weights), so
    Zoology's per-config example counts are weights and survive a smaller total unchanged in
    proportion. Each part is kept at its own length: batches hold rows of one part.
    """

    seq_len: int
    num_kv_pairs: int
    weight: int = 1


# The three (seq_len, num_kv_pairs) settings of Zoology's ICLR'24 figure 2
# (zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py). Zoology trains one model
# per setting; memlab's default MQAR task mixes them in equal shares. `presets.py` holds Zoology's
# protocols as Zoology runs them.
ICLR24_FIGURE2_SETTINGS = (
    RecallPart(seq_len=64, num_kv_pairs=4),
    RecallPart(seq_len=128, num_kv_pairs=8),
    RecallPart(seq_len=256, num_kv_pairs=16),
)


class MQARTask(Strict):
    """Zoology's multi-query associative recall; `parts` is the length mixture of the train set.

    `test_parts=None` tests on the training mixture; give longer parts to test extrapolation.
    """

    kind: Literal["mqar"] = "mqar"
    vocab_size: int = ZOOLOGY_VOCAB
    power_a: float = 0.01
    random_non_queries: bool = True
    parts: tuple[RecallPart, ...] = ICLR24_FIGURE2_SETTINGS
    test_parts: tuple[RecallPart, ...] | None = None

    @property
    def row_width(self) -> int:
        """Tokens in the longest row (the prepared data keeps each part at its own length)."""
        return max(part.seq_len for part in self.parts)

    def part_list(self) -> tuple[RecallPart, ...]:
        return self.parts

    def part_weights(self) -> tuple[int, ...]:
        return tuple(part.weight for part in self.parts)

    def part_seq_len(self, part: RecallPart) -> int:
        return part.seq_len

    def context_pairs(self, part: RecallPart) -> int:
        """Key-value slots written before the queries start."""
        return part.num_kv_pairs

    def check(self) -> None:
        _require(self.power_a > 0, f"task.power_a={self.power_a} must be > 0 (1.0 is uniform)")
        for name, parts in (("parts", self.parts), ("test_parts", self.test_parts or self.parts)):
            _require(len(parts) > 0, f"task.{name} is empty: give at least one (seq_len, pairs)")
            for part in parts:
                self._check_part(name, part)

    def _check_part(self, name: str, part: RecallPart) -> None:
        where = f"task.{name} entry (seq_len={part.seq_len}, num_kv_pairs={part.num_kv_pairs})"
        _require(part.weight >= 1, f"{where}: weight={part.weight} must be >= 1")
        _require(part.num_kv_pairs >= 1, f"{where}: num_kv_pairs must be >= 1")
        _require(part.seq_len % 2 == 0, f"{where}: seq_len must be even (Zoology's constraint)")
        need = 2 * self.context_pairs(part) + 2 * part.num_kv_pairs
        _require(
            part.seq_len >= need,
            f"{where}: seq_len must be >= {need} to hold the pairs and one query per key; "
            "raise seq_len or lower num_kv_pairs",
        )
        _require(
            self.vocab_size > part.seq_len,
            f"task.vocab_size={self.vocab_size} must exceed seq_len={part.seq_len} "
            "(Zoology's constraint); raise vocab_size",
        )

    def test_task(self) -> MQARTask:
        """The same task with the test mixture in `parts`, which is what the generator reads."""
        return self.model_copy(update={"parts": self.test_parts or self.parts})


class ForgettingMQARTask(MQARTask):
    """MQAR where `num_updates` keys are re-assigned a new value; the answer is the latest one."""

    kind: Literal["forgetting_mqar"] = "forgetting_mqar"  # type: ignore[assignment]
    num_updates: int = 2

    def context_pairs(self, part: RecallPart) -> int:
        return part.num_kv_pairs + self.num_updates

    def _check_part(self, name: str, part: RecallPart) -> None:
        _require(self.num_updates >= 0, f"task.num_updates={self.num_updates} must be >= 0")
        _require(
            self.num_updates <= part.num_kv_pairs,
            f"task.num_updates={self.num_updates} exceeds num_kv_pairs={part.num_kv_pairs} in "
            f"task.{name}: lower num_updates (each update re-assigns a distinct key)",
        )
        super()._check_part(name, part)


class CopyTask(Strict):
    """NTM copy: random `width`-bit vectors (one token each), a delimiter, then reproduce them.

    Tokens: 0 pad, 1 delimiter, 2 blank, 3 + vector value; so the vocabulary is 2**width + 3.
    """

    kind: Literal["copy"] = "copy"
    width: int = 8
    lengths: tuple[int, ...] = tuple(range(1, 21))
    test_lengths: tuple[int, ...] | None = (40, 80)

    @property
    def vocab_size(self) -> int:
        return 2**self.width + 3

    @property
    def row_width(self) -> int:
        """Tokens in the longest row: twice the longest length (vectors, then answers)."""
        return 2 * max(self.lengths)

    def part_list(self) -> tuple[int, ...]:
        return self.lengths

    def part_weights(self) -> tuple[int, ...]:
        return (1,) * len(self.lengths)

    def part_seq_len(self, part: int) -> int:
        return 2 * part

    def check(self) -> None:
        _require(1 <= self.width <= 16, f"task.width={self.width} must be in [1, 16] bits")
        for name, lengths in (("lengths", self.lengths), ("test_lengths", self.test_lengths)):
            lengths = lengths if lengths is not None else self.lengths
            _require(len(lengths) > 0, f"task.{name} is empty: give at least one length")
            bad = [length for length in lengths if length < 1]
            _require(not bad, f"task.{name} has lengths {bad}: every length must be >= 1")

    def test_task(self) -> CopyTask:
        return self.model_copy(update={"lengths": self.test_lengths or self.lengths})


class SelectivePart(Strict):
    """One bucket of selective copying: `num_tokens` to remember inside rows of `seq_len`."""

    seq_len: int
    num_tokens: int


class SelectiveCopyTask(Strict):
    """Selective copying (Mamba, Gu & Dao 2023): tokens scattered among noise, reproduce in order.

    Tokens: 0 pad, 1 noise, 2 delimiter, 3 blank, data tokens from [4, vocab_size).
    """

    kind: Literal["selective_copy"] = "selective_copy"
    vocab_size: int = 20
    parts: tuple[SelectivePart, ...] = (SelectivePart(seq_len=256, num_tokens=16),)
    test_parts: tuple[SelectivePart, ...] | None = None

    @property
    def row_width(self) -> int:
        """Tokens in the longest row (the prepared data keeps each part at its own length)."""
        return max(part.seq_len for part in self.parts)

    def part_list(self) -> tuple[SelectivePart, ...]:
        return self.parts

    def part_weights(self) -> tuple[int, ...]:
        return (1,) * len(self.parts)

    def part_seq_len(self, part: SelectivePart) -> int:
        return part.seq_len

    def check(self) -> None:
        _require(
            self.vocab_size >= 5,
            f"task.vocab_size={self.vocab_size} must be >= 5 (4 reserved tokens + data tokens)",
        )
        for name, parts in (("parts", self.parts), ("test_parts", self.test_parts or self.parts)):
            _require(len(parts) > 0, f"task.{name} is empty: give at least one (seq_len, tokens)")
            for part in parts:
                where = f"task.{name} entry (seq_len={part.seq_len}, num_tokens={part.num_tokens})"
                _require(part.num_tokens >= 1, f"{where}: num_tokens must be >= 1")
                _require(
                    part.seq_len >= 2 * part.num_tokens,
                    f"{where}: seq_len must be >= 2 * num_tokens = {2 * part.num_tokens} "
                    "(the tokens, then as many answer slots); raise seq_len",
                )

    def test_task(self) -> SelectiveCopyTask:
        return self.model_copy(update={"parts": self.test_parts or self.parts})


class TextTask(Strict):
    """Byte-level language modelling on local text, laid out as streams for truncated backprop.

    The corpus is `files` (a glob), or `hf_path` (a `datasets` data set saved with
    `save_to_disk`, column `text_column`), or by default the Python standard library's sources.
    Each row holds `stream_len + 1` consecutive bytes; training cuts rows into segments.
    """

    kind: Literal["text"] = "text"
    files: str | None = None
    hf_path: Path | None = None
    hf_split: str = "train"
    text_column: str = "text"
    stream_len: int = 512
    max_bytes: int = 8_000_000
    validation_fraction: float = 0.05

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def row_width(self) -> int:
        return self.stream_len

    def check(self) -> None:
        _require(
            self.files is None or self.hf_path is None,
            "task.files and task.hf_path are both set: choose one corpus",
        )
        _require(self.stream_len >= 1, f"task.stream_len={self.stream_len} must be >= 1")
        _require(self.max_bytes >= 2, f"task.max_bytes={self.max_bytes} must be >= 2")
        _require(
            0 < self.validation_fraction < 1,
            f"task.validation_fraction={self.validation_fraction} must be in (0, 1)",
        )


class Seq2SeqMQARTask(Strict):
    """MQAR as sequence-to-sequence: the context is the key-value pairs, the decoder is asked for
    the value of every key (tasks/seq2seq_mqar.py). Same token ranges as MQAR: keys [1, V/2),
    values [V/2, V). `num_kv_pairs` is the length mixture of the train set; `test_num_kv_pairs=None`
    tests on it too."""

    kind: Literal["seq2seq_mqar"] = "seq2seq_mqar"
    vocab_size: int = ZOOLOGY_VOCAB
    num_kv_pairs: tuple[int, ...] = (4, 8, 16)
    test_num_kv_pairs: tuple[int, ...] | None = None

    @property
    def row_width(self) -> int:
        """Decoder tokens per row: a query and its answer per key, for the most keys."""
        return 2 * max(self.num_kv_pairs)

    @property
    def context_width(self) -> int:
        return 2 * max(self.num_kv_pairs)

    def part_list(self) -> tuple[int, ...]:
        return self.num_kv_pairs

    def part_weights(self) -> tuple[int, ...]:
        return (1,) * len(self.num_kv_pairs)

    def part_seq_len(self, part: int) -> int:
        """Tokens a row of `part` pairs stores: its context and its decoder row, 2k each."""
        return 4 * part

    def check(self) -> None:
        for name in ("num_kv_pairs", "test_num_kv_pairs"):
            counts = getattr(self, name) or self.num_kv_pairs
            _require(len(counts) > 0, f"task.{name} is empty: give at least one count")
            _require(min(counts) >= 1, f"task.{name}={counts}: every count must be >= 1")
            _check_pair_ranges(self.vocab_size, max(counts), 1, f"task.{name}")

    def test_task(self) -> Seq2SeqMQARTask:
        return self.model_copy(update={"num_kv_pairs": self.test_num_kv_pairs or self.num_kv_pairs})


def _check_pair_ranges(vocab_size: int, pairs: int, first_key: int, where: str) -> None:
    """Keys from [first_key, V/2) and values from [V/2, V) must hold `pairs` distinct each."""
    keys, values = vocab_size // 2 - first_key, vocab_size - vocab_size // 2
    _require(
        min(keys, values) >= pairs,
        f"task.vocab_size={vocab_size} holds {keys} keys and {values} values, fewer than the "
        f"{pairs} distinct pairs of {where}; raise vocab_size to at least "
        f"{2 * (pairs + first_key)}",
    )


class Seq2SeqCopyTask(Strict):
    """Copy a sequence of symbols from the context (tasks/seq2seq_copy.py), lengths mixed.

    Tokens: 0 pad, 1 go, 2 end, symbols from [3, vocab_size). `test_lengths=None` tests at twice
    the longest training length, to see whether the memory extrapolates.
    """

    kind: Literal["seq2seq_copy"] = "seq2seq_copy"
    vocab_size: int = 32
    lengths: tuple[int, ...] = tuple(range(1, 17))
    test_lengths: tuple[int, ...] | None = None

    @property
    def row_width(self) -> int:
        """Decoder tokens per row: `go` or `end` plus the longest sequence."""
        return max(self.lengths) + 1

    @property
    def context_width(self) -> int:
        return max(self.lengths)

    def part_list(self) -> tuple[int, ...]:
        return self.lengths

    def part_weights(self) -> tuple[int, ...]:
        return (1,) * len(self.lengths)

    def part_seq_len(self, part: int) -> int:
        """Tokens a row of length L stores: L in the context, L + 1 in the decoder row."""
        return 2 * part + 1

    def check(self) -> None:
        _require(
            self.vocab_size >= 4,
            f"task.vocab_size={self.vocab_size} must be >= 4 (3 reserved tokens + symbols)",
        )
        for name in ("lengths", "test_lengths"):
            lengths = getattr(self, name)
            if lengths is None:
                continue
            _require(len(lengths) > 0, f"task.{name} is empty: give at least one length")
            bad = [length for length in lengths if length < 1]
            _require(not bad, f"task.{name} has lengths {bad}: every length must be >= 1")

    def test_task(self) -> Seq2SeqCopyTask:
        lengths = self.test_lengths or (2 * max(self.lengths),)
        return self.model_copy(update={"lengths": lengths})


class Seq2SeqReverseTask(Seq2SeqCopyTask):
    """As `Seq2SeqCopyTask`, but the decoder writes the symbols in reverse order."""

    kind: Literal["seq2seq_reverse"] = "seq2seq_reverse"  # type: ignore[assignment]


class LongRecallPart(Strict):
    """One bucket of long-context recall: `num_kv_pairs` pairs hidden in `context_len` tokens of
    noise, `num_queries` of them asked for."""

    context_len: int
    num_kv_pairs: int
    num_queries: int


class Seq2SeqRecallTask(Strict):
    """Associative recall from a context longer than the memory (tasks/seq2seq_recall.py).

    Tokens: 0 pad, 1 noise, keys [2, V/2), values [V/2, V). A memory pooled to fewer slots than
    there are pairs cannot hold them all, so `memory_size` matters.
    """

    kind: Literal["seq2seq_recall"] = "seq2seq_recall"
    vocab_size: int = 256
    parts: tuple[LongRecallPart, ...] = (
        LongRecallPart(context_len=256, num_kv_pairs=16, num_queries=8),
    )
    test_parts: tuple[LongRecallPart, ...] | None = None

    @property
    def row_width(self) -> int:
        return 2 * max(part.num_queries for part in self.parts)

    @property
    def context_width(self) -> int:
        return max(part.context_len for part in self.parts)

    def part_list(self) -> tuple[LongRecallPart, ...]:
        return self.parts

    def part_weights(self) -> tuple[int, ...]:
        return (1,) * len(self.parts)

    def part_seq_len(self, part: LongRecallPart) -> int:
        """Tokens a row stores: its context and a query and answer per question."""
        return part.context_len + 2 * part.num_queries

    def check(self) -> None:
        for name, parts in (("parts", self.parts), ("test_parts", self.test_parts or self.parts)):
            _require(len(parts) > 0, f"task.{name} is empty: give at least one part")
            for part in parts:
                self._check_part(name, part)

    def _check_part(self, name: str, part: LongRecallPart) -> None:
        where = (
            f"task.{name} entry (context_len={part.context_len}, "
            f"num_kv_pairs={part.num_kv_pairs}, num_queries={part.num_queries})"
        )
        _require(part.num_kv_pairs >= 1, f"{where}: num_kv_pairs must be >= 1")
        _require(part.context_len % 2 == 0, f"{where}: context_len must be even (pair slots)")
        _require(
            part.context_len >= 2 * part.num_kv_pairs,
            f"{where}: context_len must be >= {2 * part.num_kv_pairs} to hold the pairs",
        )
        _require(
            1 <= part.num_queries <= part.num_kv_pairs,
            f"{where}: num_queries must be in [1, num_kv_pairs] (each asks a distinct key)",
        )
        _check_pair_ranges(self.vocab_size, part.num_kv_pairs, 2, where)

    def test_task(self) -> Seq2SeqRecallTask:
        return self.model_copy(update={"parts": self.test_parts or self.parts})


Seq2SeqTask = Seq2SeqMQARTask | Seq2SeqCopyTask | Seq2SeqReverseTask | Seq2SeqRecallTask
#: Task kinds whose rows carry a `context` column for an encoder-decoder model.
SEQ2SEQ_KINDS = frozenset({"seq2seq_mqar", "seq2seq_copy", "seq2seq_reverse", "seq2seq_recall"})


TaskConfig = Annotated[
    MQARTask | ForgettingMQARTask | CopyTask | SelectiveCopyTask | TextTask | Seq2SeqTask,
    Field(discriminator="kind"),
]
SyntheticTask = MQARTask | ForgettingMQARTask | CopyTask | SelectiveCopyTask | Seq2SeqTask


class DataConfig(Strict):
    """Everything that decides the prepared data; its JSON (less `cache_dir` and `blocks`) keys
    the cache.

    `num_train_examples`/`num_test_examples` size the synthetic tasks (split over the task's parts
    by their weights); a text corpus is sized by `task.max_bytes`. `blocks` caps the generation
    tasks running at once (None: one per CPU of the Ray cluster); it does not change the data,
    which is drawn in fixed chunks with a seed each.
    """

    task: TaskConfig = Field(default_factory=MQARTask)
    cache_dir: Path = Path("memlab_runs/data")
    num_train_examples: int = 100_000
    num_test_examples: int = 3_000
    seed: int = 0
    blocks: int | None = None

    def check(self) -> None:
        _require(self.seed >= 0, f"seed={self.seed} must be >= 0")
        _require(
            self.blocks is None or self.blocks >= 1, f"blocks={self.blocks} must be >= 1 or None"
        )
        for name in ("num_train_examples", "num_test_examples"):
            count = getattr(self, name)
            _require(count >= 1, f"{name}={count} must be >= 1")
        self.task.check()


def parse_data_config(raw: dict[str, Any]) -> DataConfig:
    """Validate a plain dict (from the CLI or across a Ray boundary) into a checked DataConfig."""
    try:
        config = DataConfig.model_validate(raw)
    except ValidationError as error:
        raise DataError(f"invalid data config: {error}") from error
    config.check()
    return config


# Zoology's MQAR protocols as named data presets, read from Zoology's own configs (the training
# settings that go with them are in `presets.py`):
# - `zoology-mqar`: the MQAR data of zoology/experiments/paper_configs/arxiv24_based_figure2/
#   configs.py (the same data as zoology/experiments/mqar_example_configs/original_mqar_configs.py,
#   which draws the MQAR plot of Zoology's README): a training mixture of five (seq_len,
#   num_kv_pairs) configurations with their own example counts (`train_configs`), and seven
#   separate test configurations with more pairs and longer sequences (`test_configs`, up to
#   1,024 tokens and 256 pairs, 1,000 examples each); vocabulary 8,192 and `MQARConfig`'s
#   defaults (power_a=0.01, random_non_queries=True).
# - `zoology-iclr24-64` / `-128` / `-256`: Zoology's ICLR'24 figure 2
#   (zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py), one model per setting,
#   100,000 train and 3,000 test rows of that setting, random_non_queries=False.
ZOOLOGY_MQAR_TRAIN = (
    RecallPart(seq_len=64, num_kv_pairs=4, weight=100_000),
    RecallPart(seq_len=128, num_kv_pairs=8, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=16, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=32, weight=20_000),
    RecallPart(seq_len=256, num_kv_pairs=64, weight=20_000),
)
ZOOLOGY_MQAR_TEST = (
    RecallPart(seq_len=64, num_kv_pairs=4, weight=1_000),
    RecallPart(seq_len=64, num_kv_pairs=8, weight=1_000),
    RecallPart(seq_len=64, num_kv_pairs=16, weight=1_000),
    RecallPart(seq_len=128, num_kv_pairs=32, weight=1_000),
    RecallPart(seq_len=256, num_kv_pairs=64, weight=1_000),
    RecallPart(seq_len=512, num_kv_pairs=128, weight=1_000),
    RecallPart(seq_len=1024, num_kv_pairs=256, weight=1_000),
)


def zoology_mqar() -> DataConfig:
    """Zoology's MQAR mixture: 180,000 training rows in five parts, 7,000 test rows in seven."""
    task = MQARTask(
        vocab_size=ZOOLOGY_VOCAB, parts=ZOOLOGY_MQAR_TRAIN, test_parts=ZOOLOGY_MQAR_TEST
    )
    return DataConfig(
        task=task,
        num_train_examples=sum(part.weight for part in ZOOLOGY_MQAR_TRAIN),
        num_test_examples=sum(part.weight for part in ZOOLOGY_MQAR_TEST),
    )


def zoology_iclr24(seq_len: int) -> DataConfig:
    """One setting of Zoology's ICLR'24 figure 2: train and test on that (seq_len, pairs)."""
    settings = {part.seq_len: part for part in ICLR24_FIGURE2_SETTINGS}
    _require(seq_len in settings, f"seq_len={seq_len} is not a figure-2 setting: {[*settings]}")
    task = MQARTask(vocab_size=ZOOLOGY_VOCAB, random_non_queries=False, parts=(settings[seq_len],))
    return DataConfig(task=task, num_train_examples=100_000, num_test_examples=3_000)


PRESETS: dict[str, Callable[[], DataConfig]] = {
    "zoology-mqar": zoology_mqar,
    "zoology-iclr24-64": partial(zoology_iclr24, 64),
    "zoology-iclr24-128": partial(zoology_iclr24, 128),
    "zoology-iclr24-256": partial(zoology_iclr24, 256),
}


def config_from_overrides(
    kind: str | None = None, overrides: list[str] | None = None, cache_dir: Path | None = None
) -> DataConfig:
    """A checked DataConfig from `key=value` strings with dotted paths (`task.vocab_size=64`).

    Values are read as JSON when they parse (numbers, lists, objects), else as plain strings.
    `kind` is a task kind or a preset name (`PRESETS`, e.g. `zoology-mqar`), whose whole data
    config the overrides then change; it defaults to MQAR, as in `DataConfig()`.
    """
    if kind in PRESETS:
        raw: dict[str, Any] = PRESETS[kind]().model_dump(mode="json", exclude={"cache_dir"})
    else:
        raw = {"task": {"kind": kind or MQARTask().kind}}
    if cache_dir is not None:
        raw["cache_dir"] = str(cache_dir)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"override {item!r} is not key=value: write e.g. task.vocab_size=64")
        *parents, leaf = key.split(".")
        node = raw
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _parse_value(value)
    return parse_data_config(raw)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
