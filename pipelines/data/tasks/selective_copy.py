"""Selective copying (Gu & Dao, Mamba, 2023): data tokens scattered among noise, copy them in order.

A row of `seq_len` tokens for `num_tokens = m`: a context of `seq_len - m` noise tokens with the
m data tokens at random positions, then a delimiter and m - 1 blanks. Unlike plain copy the model
must choose what to store: noise carries nothing and a good memory skips it.

    inputs:  N a N N b N c N  DELIM BLANK BLANK
    labels:  -  ...           a     b     c
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import SelectiveCopyTask, SelectivePart
from pipelines.data.tasks.common import IGNORE, Batch, distinct_choice, generate_mixture

NOISE = 1
DELIMITER = 2
BLANK = 3
FIRST_DATA = 4


def generate(config: SelectiveCopyTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows of the `config.parts` mixture, padded to the longest part and
    shuffled; `generate_part` makes one part's rows at their own length."""
    return generate_mixture(config, num_examples, seed, generate_part)


def generate_part(
    config: SelectiveCopyTask, part: SelectivePart, n: int, rng: np.random.Generator
) -> Batch:
    m, context = part.num_tokens, part.seq_len - part.num_tokens
    tokens = rng.integers(FIRST_DATA, config.vocab_size, size=(n, m))
    positions = np.sort(distinct_choice(rng, 0, context, n, m), axis=1)
    inputs = np.full((n, part.seq_len), BLANK, dtype=np.int64)
    inputs[:, :context] = NOISE
    inputs[np.arange(n)[:, None], positions] = tokens
    inputs[:, context] = DELIMITER
    labels = np.full((n, part.seq_len), IGNORE, dtype=np.int64)
    labels[:, context:] = tokens
    return {
        "inputs": inputs,
        "labels": labels,
        "num_tokens": np.full(n, m, dtype=np.int64),
        "seq_len": np.full(n, part.seq_len, dtype=np.int64),
    }
