"""Task metrics accumulated over evaluation batches.

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
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

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
