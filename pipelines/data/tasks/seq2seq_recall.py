"""Associative recall from a long, noisy context: more to read than the memory holds.

The encoder's `context` is `context_len` tokens of noise (token 1) with k key-value pairs at
random pair slots (even offsets; keys distinct from [2, V/2), values distinct from [V/2, V));
the decoder asks for `num_queries` of the keys, each once, answer fed back (as seq2seq MQAR):

    context: N N k1 v1 N N N N k2 v2 N N k3 v3 N N
    inputs:  k3 v3 k1 v1
    labels:  v3 -  v1 -

A memory pooled to `memory_size` slots must keep the pairs and drop the noise: one slot can hold
one pair (the bidirectional encoder can merge a key with its value), so with fewer slots than
pairs some answers are lost, and a memory of every position holds `context_len` slots, most of
them noise. Accuracy: the share of scored positions (one per query) predicted exactly, grouped by
`context_len`. Chance is 1 / (V - V/2).
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import LongRecallPart, Seq2SeqRecallTask
from pipelines.data.tasks.common import Batch, distinct_choice, generate_mixture
from pipelines.data.tasks.seq2seq import permutations, questions, seq2seq_widths

NOISE = 1
FIRST_KEY = 2


def generate(config: Seq2SeqRecallTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows of the `config.parts` mixture, padded to the longest part."""
    return generate_mixture(config, num_examples, seed, generate_part, seq2seq_widths)


def generate_part(
    config: Seq2SeqRecallTask, part: LongRecallPart, n: int, rng: np.random.Generator
) -> Batch:
    vocab, k, q = config.vocab_size, part.num_kv_pairs, part.num_queries
    keys = distinct_choice(rng, FIRST_KEY, vocab // 2, n, k)
    values = distinct_choice(rng, vocab // 2, vocab, n, k)
    slots = 2 * distinct_choice(rng, 0, part.context_len // 2, n, k)  # [n, k] pair offsets
    rows = np.arange(n)[:, None]
    context = np.full((n, part.context_len), NOISE, dtype=np.int64)
    context[rows, slots] = keys
    context[rows, slots + 1] = values
    asked = permutations(rng, n, k)[:, :q]
    inputs, labels = questions(keys[rows, asked], values[rows, asked])
    return {
        "context": context,
        "inputs": inputs,
        "labels": labels,
        "num_kv_pairs": np.full(n, k, dtype=np.int64),
        "num_queries": np.full(n, q, dtype=np.int64),
        "context_len": np.full(n, part.context_len, dtype=np.int64),
        "seq_len": np.full(n, 2 * q, dtype=np.int64),
    }
