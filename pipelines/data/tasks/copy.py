"""NTM copy (Graves et al., 2014): read random bit vectors, then reproduce them after a delimiter.

A `width`-bit vector is one token (3 + its value). A row for length L has 2L tokens:

    inputs:  x1 x2 ... xL DELIM BLANK ... BLANK
    labels:  -  -  ... -  x1    x2    ... xL

As in the NTM, the answer phase reads blanks, so nothing but memory gives the answer. Train on
lengths 1-20 and test on 40 and 80 to see whether the memory generalises to longer sequences.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import CopyTask
from pipelines.data.tasks.common import IGNORE, Batch, generate_mixture

DELIMITER = 1
BLANK = 2
FIRST_SYMBOL = 3


def generate(config: CopyTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows spread evenly over `config.lengths`, padded to twice the longest and
    shuffled; `generate_part` makes one length's rows at their own width."""
    return generate_mixture(config, num_examples, seed, generate_part)


def generate_part(config: CopyTask, length: int, n: int, rng: np.random.Generator) -> Batch:
    symbols = FIRST_SYMBOL + rng.integers(0, 2**config.width, size=(n, length))
    inputs = np.full((n, 2 * length), BLANK, dtype=np.int64)
    inputs[:, :length] = symbols
    inputs[:, length] = DELIMITER
    labels = np.full((n, 2 * length), IGNORE, dtype=np.int64)
    labels[:, length:] = symbols
    return {
        "inputs": inputs,
        "labels": labels,
        "length": np.full(n, length, dtype=np.int64),
        "seq_len": np.full(n, 2 * length, dtype=np.int64),
    }
