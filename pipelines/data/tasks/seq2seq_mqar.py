"""MQAR as a sequence-to-sequence task: write the pairs into memory once, then ask every key.

After Zoology's `multiquery_ar` (Arora et al., 2023), split in two: the encoder's `context` holds
the k pairs `k1 v1 k2 v2 ...` (keys distinct from [1, V/2), values distinct from [V/2, V), MQAR's
ranges), and the decoder asks for each key once, in a random order, with the true answer fed back:

    context: k1 v1 k2 v2 k3 v3
    inputs:  k2 v2 k3 v3 k1 v1
    labels:  v2 -  v3 -  v1 -

Accuracy: the share of scored positions (one per key) whose value is predicted exactly; grouped by
`num_kv_pairs`. Chance is 1 / (V - V/2). A row for k pairs has a context of 2k and a decoder of 2k
tokens; mixtures pad both with 0 (labels with -100). Concatenated (`seq2seq.as_decoder_only`), a
row is Zoology's MQAR at seq_len 4k with a query at every slot after the context.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import Seq2SeqMQARTask
from pipelines.data.tasks.common import Batch, distinct_choice, generate_mixture
from pipelines.data.tasks.mqar import interleave
from pipelines.data.tasks.seq2seq import permutations, questions, seq2seq_widths


def generate(config: Seq2SeqMQARTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows spread evenly over `config.num_kv_pairs`, padded to the most pairs."""
    return generate_mixture(config, num_examples, seed, generate_part, seq2seq_widths)


def generate_part(config: Seq2SeqMQARTask, k: int, n: int, rng: np.random.Generator) -> Batch:
    vocab = config.vocab_size
    keys = distinct_choice(rng, 1, vocab // 2, n, k)
    values = distinct_choice(rng, vocab // 2, vocab, n, k)
    order = permutations(rng, n, k)
    rows = np.arange(n)[:, None]
    inputs, labels = questions(keys[rows, order], values[rows, order])
    return {
        "context": interleave(keys, values),
        "inputs": inputs,
        "labels": labels,
        "num_kv_pairs": np.full(n, k, dtype=np.int64),
        "context_len": np.full(n, 2 * k, dtype=np.int64),
        "seq_len": np.full(n, 2 * k, dtype=np.int64),
    }
