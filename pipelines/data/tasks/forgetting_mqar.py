"""Forgetting MQAR, after Zoology's `forgetting_mqar`: some keys are re-assigned, latest wins.

The context holds the `k` original pairs, then `num_updates` pairs that re-assign distinct keys
to a new value (never the old one). Queries ask for every key; the target is the latest value.
This is the direct test of a forget threshold: a memory that keeps the stale pair answers wrong.

    inputs:  A 5 B 3 C 7 | A 9 | ... A ... B ... C ...
    labels:                        9     3     7
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import ForgettingMQARTask, RecallPart
from pipelines.data.tasks.common import Batch, distinct_choice, generate_mixture
from pipelines.data.tasks.mqar import assemble, interleave


def generate(config: ForgettingMQARTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows of the `config.parts` mixture, padded to the longest part and
    shuffled; `generate_part` makes one part's rows at their own length."""
    return generate_mixture(config, num_examples, seed, generate_part)


def generate_part(
    config: ForgettingMQARTask, part: RecallPart, n: int, rng: np.random.Generator
) -> Batch:
    vocab, k, u = config.vocab_size, part.num_kv_pairs, config.num_updates
    keys = distinct_choice(rng, 1, vocab // 2, n, k)
    values = distinct_choice(rng, vocab // 2, vocab, n, k)
    which = distinct_choice(rng, 0, k, n, u)
    rows = np.arange(n)[:, None]
    new_values = _different_values(rng, values[rows, which], vocab // 2, vocab)
    latest = values.copy()
    latest[rows, which] = new_values
    context = np.concatenate(
        [interleave(keys, values), interleave(keys[rows, which], new_values)], 1
    )
    batch = assemble(config, part, context, keys, latest, rng)
    batch["num_updates"] = np.full(n, u, dtype=np.int64)
    return batch


def _different_values(rng: np.random.Generator, old: np.ndarray, low: int, high: int) -> np.ndarray:
    """Uniform values from [low, high) that differ from `old` elementwise: a shift of 1..m-1."""
    size = high - low
    shift = rng.integers(1, size, size=old.shape)
    return low + (old - low + shift) % size
