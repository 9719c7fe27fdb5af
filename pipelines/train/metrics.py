"""Metrics accumulated over batches: training steps between two logs, and evaluation.

Training (`TrainWindow`): losses added on the device, read once per logging window.

Evaluation (`EvalAccumulator`):

- every task: loss (mean cross-entropy over scored tokens) and token accuracy;
- associative recall: accuracy per test configuration, `accuracy_seq_len_{T}_num_kv_pairs_{k}`
  (Zoology reports recall per configuration; two configurations may share a pair count);
- copy: bits wrong per sequence (the NTM paper's measure) and accuracy per copy length,
  `accuracy_length_{L}`;
- selective copy: accuracy per configuration, `accuracy_seq_len_{T}_num_tokens_{m}`;
- text: bits per byte (byte tokens, so the loss in bits is bits per byte);
- sequence to sequence: MQAR per number of pairs, long-context recall per context length, copy
  and reverse per length plus `sequence_accuracy` (rows with every scored token right).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor


class StepRecord(Protocol):
    """What a window reads of one training step (`pipelines.train.loop.StepResult`); a protocol
    here, so that metrics need not import the loop that imports them."""

    @property
    def loss_sum(self) -> Tensor: ...
    @property
    def aux_sum(self) -> Tensor: ...
    @property
    def segments(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def state_bytes_per_sequence(self) -> int: ...
    @property
    def memory(self) -> dict[str, float]: ...


IGNORE_INDEX = -100

# Which metadata columns name a test configuration, per task kind; the metric name is
# `accuracy_` followed by `{column}_{value}` for each, joined by `_`.
GROUP_COLUMNS = {
    "mqar": ("seq_len", "num_kv_pairs"),
    "forgetting_mqar": ("seq_len", "num_kv_pairs"),
    "copy": ("length",),
    "selective_copy": ("seq_len", "num_tokens"),
    "seq2seq_mqar": ("num_kv_pairs",),
    "seq2seq_recall": ("context_len",),
    "seq2seq_copy": ("length",),
    "seq2seq_reverse": ("length",),
}
# Tasks whose output is only useful whole: a copy with one wrong symbol is a wrong copy.
SEQUENCE_ACCURACY_KINDS = frozenset({"seq2seq_copy", "seq2seq_reverse"})
COPY_FIRST_VECTOR_TOKEN = 3  # copy tokens: 0 pad, 1 delimiter, 2 blank, 3 + bit-vector value


class TrainWindow:
    """The training steps since the last log, kept on the device until `flush()` reads them all
    with one host sync.

    `flush()` returns (keys as logged): `train_loss` and `train_aux_loss` (means over the
    window's segments; the aux loss only where it is not 0), `tokens_per_second` (the window's
    tokens over its wall time), `state_bytes_per_sequence` and `memory/*` of the last step's
    state, and where the wall time went, in ms per step: `time/step_ms` (all of it),
    `time/data_wait_ms` (waiting for the next batch), `time/compute_ms` (host time in
    `train_batch`; on CUDA only the queueing, and the device's time lands in the sync of the
    next flush) and `time/log_ms` (the previous flush and log call).
    """

    def __init__(self) -> None:
        self._start(time.perf_counter())

    def _start(self, now: float) -> None:
        self.started = now
        self.steps = 0
        self.segments = 0
        self.tokens = 0
        self.loss_sums: list[Tensor] = []
        self.aux_sums: list[Tensor] = []
        self.wait_seconds = 0.0
        self.compute_seconds = 0.0
        self.log_seconds = 0.0
        self.last: StepRecord | None = None

    def waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def logged(self, seconds: float) -> None:
        """The log call that follows a flush runs in the next window's wall time."""
        self.log_seconds += seconds

    def add(self, result: StepRecord) -> None:
        self.steps += 1
        self.segments += result.segments
        self.tokens += result.tokens
        self.loss_sums.append(result.loss_sum)
        self.aux_sums.append(result.aux_sum)
        self.compute_seconds += result.seconds
        self.last = result

    def flush(self) -> dict[str, float]:
        if self.last is None:
            raise ValueError("flush() of a window without steps: add() a step first")
        sums = torch.stack([torch.stack(self.loss_sums), torch.stack(self.aux_sums)]).sum(1)
        loss, aux = (value / self.segments for value in sums.tolist())  # the one host sync
        now = time.perf_counter()
        wall = now - self.started
        per_step = 1000 / self.steps
        metrics = {
            "train_loss": loss,
            "tokens_per_second": self.tokens / max(wall, 1e-9),
            "state_bytes_per_sequence": self.last.state_bytes_per_sequence,
            **{f"memory/{key}": value for key, value in self.last.memory.items()},
            "time/step_ms": wall * per_step,
            "time/data_wait_ms": self.wait_seconds * per_step,
            "time/compute_ms": self.compute_seconds * per_step,
            "time/log_ms": self.log_seconds * per_step,
        }
        if aux:
            metrics["train_aux_loss"] = aux
        self._start(now)
        return metrics


class EvalAccumulator:
    """Adds up per-batch counts; `result()` gives the metric dict (keys without a prefix)."""

    def __init__(self, task_kind: str | None, bit_width: int | None = None) -> None:
        self.task_kind = task_kind
        self.bit_width = bit_width
        self.loss_sum = 0.0
        self.scored = 0
        self.correct = 0
        self.sequences = 0
        self.bits_wrong = 0
        self.rows_right = 0
        self.group_correct: dict[tuple[int, ...], int] = defaultdict(int)
        self.group_scored: dict[tuple[int, ...], int] = defaultdict(int)

    def add(self, logits: Tensor, batch: Mapping[str, Tensor]) -> None:
        labels = batch["labels"]  # [B, T]
        scored = labels != IGNORE_INDEX
        safe_labels = labels.clamp_min(0)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), safe_labels.flatten(), reduction="none"
        ).view_as(labels)
        predictions = logits.argmax(-1)
        hits = (predictions == labels) & scored
        self.loss_sum += loss[scored].sum().item()
        self.scored += int(scored.sum())
        self.correct += int(hits.sum())
        self.sequences += labels.shape[0]
        self.rows_right += int((hits | ~scored).all(1).sum())
        if self.task_kind == "copy":
            self.bits_wrong += _bits_wrong(predictions, labels, scored, self.bit_width or 8)
        self._add_groups(batch, hits, scored)

    def _add_groups(self, batch: Mapping[str, Tensor], hits: Tensor, scored: Tensor) -> None:
        columns = GROUP_COLUMNS.get(self.task_kind, ())
        if not columns or not all(column in batch for column in columns):
            return
        keys = torch.stack([batch[column].long() for column in columns], dim=1)  # [B, groups]
        for key in keys.unique(dim=0).tolist():
            rows = (keys == keys.new_tensor(key)).all(dim=1)
            self.group_correct[tuple(key)] += int(hits[rows].sum())
            self.group_scored[tuple(key)] += int(scored[rows].sum())

    def result(self) -> dict[str, float]:
        loss = self.loss_sum / max(self.scored, 1)
        out = {"loss": loss, "accuracy": self.correct / max(self.scored, 1)}
        if self.task_kind == "text":
            out["bits_per_byte"] = loss / math.log(2)
        if self.task_kind == "copy":
            out["bits_wrong_per_sequence"] = self.bits_wrong / max(self.sequences, 1)
        if self.task_kind in SEQUENCE_ACCURACY_KINDS:
            out["sequence_accuracy"] = self.rows_right / max(self.sequences, 1)
        columns = GROUP_COLUMNS.get(self.task_kind, ())
        for key in sorted(self.group_scored):
            name = "_".join(f"{column}_{value}" for column, value in zip(columns, key, strict=True))
            out[f"accuracy_{name}"] = self.group_correct[key] / max(self.group_scored[key], 1)
        return out


def _bits_wrong(predictions: Tensor, labels: Tensor, scored: Tensor, width: int) -> int:
    """Hamming distance of predicted and target bit vectors; a non-vector guess is all wrong."""
    label_bits = (labels - COPY_FIRST_VECTOR_TOKEN).clamp_min(0)
    guess = predictions - COPY_FIRST_VECTOR_TOKEN
    wrong = torch.bitwise_xor(guess.clamp_min(0), label_bits)
    counts = _popcount(wrong)
    counts = torch.where(guess < 0, torch.full_like(counts, width), counts)
    return int(counts[scored].sum())


def _popcount(values: Tensor) -> Tensor:
    count = torch.zeros_like(values)
    remaining = values.clone()
    while bool((remaining > 0).any()):
        count += remaining & 1
        remaining = remaining >> 1
    return count
