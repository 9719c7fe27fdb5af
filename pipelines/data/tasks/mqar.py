"""Multi-query associative recall (MQAR), after Zoology's `multiquery_ar` (Arora et al., 2023).

A row of length T: the context `k1 v1 k2 v2 ...` (keys from [1, V/2), values from [V/2, V), keys
distinct), then a query region where each key appears once more, at an even offset drawn from a
power law (`power_a`; near positions favoured): key j gets the j-th draw of sequential sampling
without replacement, as in Zoology, so earlier keys are queried sooner on average. Targets are
-100 except at each query key, where the target is that key's value: the model reads the key and
must predict the value next. The non-query slots are 0, or random tokens from [0, V) with
`random_non_queries` (Zoology's default).

    inputs:  k1 v1 k2 v2 0  0  k1 0  0  0  k2 0      (random_non_queries=False)
    labels:  -  -  -  -  -  -  v1 -  -  -  v2 -
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import MQARTask, RecallPart
from pipelines.data.tasks.common import (
    IGNORE,
    Batch,
    distinct_choice,
    generate_mixture,
    power_law_choice,
)


def generate(config: MQARTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows of the `config.parts` mixture (shares by weight), padded to the
    longest part and shuffled; `generate_part` makes one part's rows at their own length."""
    return generate_mixture(config, num_examples, seed, generate_part)


def generate_part(config: MQARTask, part: RecallPart, n: int, rng: np.random.Generator) -> Batch:
    """`n` rows of one part, `[n, part.seq_len]` int64, with their metadata columns."""
    vocab, k = config.vocab_size, part.num_kv_pairs
    keys = distinct_choice(rng, 1, vocab // 2, n, k)
    values = distinct_choice(rng, vocab // 2, vocab, n, k)
    context = interleave(keys, values)
    return assemble(config, part, context, keys, values, rng)


def interleave(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`k1 v1 k2 v2 ...` from `[n, k]` keys and values -> `[n, 2k]`."""
    pairs = np.empty((keys.shape[0], 2 * keys.shape[1]), dtype=np.int64)
    pairs[:, 0::2] = keys
    pairs[:, 1::2] = values
    return pairs


def assemble(
    config: MQARTask,
    part: RecallPart,
    context: np.ndarray,
    keys: np.ndarray,
    answers: np.ndarray,
    rng: np.random.Generator,
) -> Batch:
    """Context, then one query per key at power-law gaps; the target at a query is its answer.

    context: [n, C]; keys, answers: [n, k]. Returns rows of exactly `part.seq_len` tokens.
    """
    n, width = context.shape[0], context.shape[1]
    space = (part.seq_len - width) // 2
    positions = width + 2 * power_law_choice(rng, space, n, part.num_kv_pairs, config.power_a)
    rows = np.arange(n)[:, None]
    inputs = np.zeros((n, part.seq_len), dtype=np.int64)
    inputs[:, :width] = context
    inputs[rows, positions] = keys
    labels = np.full((n, part.seq_len), IGNORE, dtype=np.int64)
    labels[rows, positions] = answers
    if config.random_non_queries:
        empty = inputs == 0
        inputs[empty] = rng.integers(0, config.vocab_size, size=int(empty.sum()))
    return {
        "inputs": inputs,
        "labels": labels,
        "num_kv_pairs": np.full(n, part.num_kv_pairs, dtype=np.int64),
        "seq_len": np.full(n, part.seq_len, dtype=np.int64),
    }
