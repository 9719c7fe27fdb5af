"""Pieces shared by the sequence-to-sequence tasks: the query-answer decoder layout and the
equivalent decoder-only row.

A sequence-to-sequence row has a `context` `[N, Tc]` that an encoder reads (padded with 0, which
an encoder-decoder model masks), decoder `inputs` `[N, Td]` fed with teacher forcing, and `labels`
`[N, Td]` aligned with `inputs` (-100 where unscored), plus metadata columns `[N]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.data.tasks.common import IGNORE, Batch


def seq2seq_widths(config: Any) -> dict[str, int]:
    """Padded widths of a sequence-to-sequence mixture: the encoder's `context` to the longest
    context, decoder `inputs` and `labels` to the longest decoder row."""
    return {
        "context": config.context_width,
        "inputs": config.row_width,
        "labels": config.row_width,
    }


def questions(keys: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decoder side of recall: `inputs = q1 a1 q2 a2 ...`, `labels = a1 - a2 - ...`.

    The model reads a key and must answer its value at the same position (as in MQAR); the next
    input is the true answer (teacher forcing), so a served decoder appends a key, generates the
    value, and goes on. `keys, answers: [n, k]` -> `[n, 2k]` each.
    """
    inputs = np.empty((keys.shape[0], 2 * keys.shape[1]), dtype=np.int64)
    inputs[:, 0::2] = keys
    inputs[:, 1::2] = answers
    labels = np.full_like(inputs, IGNORE)
    labels[:, 0::2] = answers
    return inputs, labels


def permutations(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """`[n, k]`: a uniformly random permutation of range(k) per row (argsort of random keys,
    which is exact and the same on every machine)."""
    return np.argsort(rng.random((n, k)), axis=1, kind="stable").astype(np.int64)


def as_decoder_only(batch: Batch) -> Batch:
    """The equivalent decoder-only rows: `inputs = context ++ inputs`, `labels = -100 ++ labels`,
    metadata kept. For one-length tasks (no padding inside the row), this is what a decoder-only
    model must solve to answer the same questions, e.g. seq2seq MQAR with k pairs becomes
    Zoology's MQAR at seq_len 4k with a query at every slot after the context."""
    context = batch["context"]
    unscored = np.full(context.shape, IGNORE, dtype=np.int64)
    rest = {name: column for name, column in batch.items() if name != "context"}
    return rest | {
        "inputs": np.concatenate([context, batch["inputs"]], axis=1),
        "labels": np.concatenate([unscored, batch["labels"]], axis=1),
        "seq_len": batch["context_len"] + batch["seq_len"],
    }
