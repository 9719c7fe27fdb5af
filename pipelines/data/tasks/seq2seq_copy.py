"""Copy and reverse as sequence-to-sequence tasks (Sutskever et al., 2014; Graves et al., 2014).

The encoder's `context` is L symbols (from [3, V)); the decoder starts from `go` and writes them
back, in order (`seq2seq_copy`) or reversed (`seq2seq_reverse`), then `end`, with the true previous
symbol fed back (teacher forcing):

    context: a b c
    inputs:  GO a b c          (reverse: GO c b a)
    labels:  a  b c END        (reverse: c  b a END)

Tokens: 0 pad, 1 go, 2 end. Every decoder position is scored, `end` included (the model must know
the length). Accuracy: the share of scored positions predicted exactly, grouped by `length`;
`sequence_accuracy`: the share of rows with every position right. Lengths are mixed in training
and tested by default at twice the longest training length, which shows whether the memory and
its positions extrapolate.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.config import Seq2SeqCopyTask
from pipelines.data.tasks.common import Batch, generate_mixture
from pipelines.data.tasks.seq2seq import seq2seq_widths

GO = 1
END = 2
FIRST_SYMBOL = 3


def generate(config: Seq2SeqCopyTask, num_examples: int, seed: int) -> Batch:
    """`num_examples` rows spread evenly over `config.lengths`, padded to the longest."""
    return generate_mixture(config, num_examples, seed, generate_part, seq2seq_widths)


def generate_part(config: Seq2SeqCopyTask, length: int, n: int, rng: np.random.Generator) -> Batch:
    symbols = rng.integers(FIRST_SYMBOL, config.vocab_size, size=(n, length))
    target = symbols[:, ::-1] if config.kind == "seq2seq_reverse" else symbols
    inputs = np.concatenate([np.full((n, 1), GO, dtype=np.int64), target], axis=1)
    labels = np.concatenate([target, np.full((n, 1), END, dtype=np.int64)], axis=1)
    return {
        "context": symbols,
        "inputs": inputs,
        "labels": labels,
        "length": np.full(n, length, dtype=np.int64),
        "context_len": np.full(n, length, dtype=np.int64),
        "seq_len": np.full(n, length + 1, dtype=np.int64),
    }
