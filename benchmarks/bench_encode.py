"""Encode once, ask many times: the cost of a query after a long context, three ways.

For each context length L (default 1,024 and 8,192 tokens), in this process, one torch thread,
untrained models of the same width:

* `encdec`: an encoder-decoder (`memory_models.encoder_decoder`) encodes the context once into its
  cross memory (all positions, or `--memory-size` pooled slots); a query of `--query` tokens then
  reads that memory through the decoder's cross-attention;
* `resend`: a decoder-only attention model reads context + query from empty memory every time,
  what a stateless client of `/v1/predict` pays;
* `session`: the decoder-only model keeps its KV cache of the context (a memlab session) and
  reads only the query.

Reported: the one-off cost (encode, or reading the context into the cache), the median query
latency, and the bytes of state one sequence holds. A bidirectional encoder is quadratic in L:
64k tokens would take about 64 times the 8k time and a mask-sized score matrix of
L x L x heads floats (64 GB), so the default stops at 8k (`--context-lengths` adds more).

Run from the repository root: `.venv/bin/python benchmarks/bench_encode.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from bench_common import (
    format_table,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    write_json,
)

from memory_models.encoder_decoder import EncoderDecoderConfig
from memory_models.model import SequenceModelConfig
from memory_models.registry import memory_config

VOCAB = 256
QUICK = {"context_lengths": [256, 1024], "repeats": 3}


@dataclasses.dataclass(frozen=True)
class Row:
    context: int
    way: str
    once_ms: float
    query_ms: float
    state_bytes: int


def models(d_model: int, memory_size: int | None):
    encdec = EncoderDecoderConfig(
        vocab_size=VOCAB,
        d_model=d_model,
        n_layers=2,
        memory=memory_config({"kind": "attention"}),
        cross_memory={"memory_size": memory_size},
    ).build()
    decoder = SequenceModelConfig(
        vocab_size=VOCAB, d_model=d_model, n_layers=2, memory={"kind": "attention"}
    ).build()
    return encdec.eval(), decoder.eval()


@torch.inference_mode()
def measure(length: int, args: argparse.Namespace) -> list[Row]:
    encdec, decoder = models(args.d_model, args.memory_size)
    context = torch.randint(3, VOCAB, (1, length))
    query = torch.randint(3, VOCAB, (1, args.query))
    started = time.perf_counter()
    memory = encdec.encode(context)
    encode_ms = 1000 * (time.perf_counter() - started)
    encoded = encdec.init_state(1).with_memory(memory)
    started = time.perf_counter()
    _, cache = decoder(context)
    cache_ms = 1000 * (time.perf_counter() - started)
    both = torch.cat([context, query], dim=1)
    timing = {"warmup": 1, "repeats": args.repeats}
    return [
        Row(
            length,
            "encdec",
            encode_ms,
            1000 * median_seconds(lambda: encdec(query, encoded), **timing),
            encoded.nbytes(),
        ),
        Row(
            length,
            "resend",
            0.0,
            1000 * median_seconds(lambda: decoder(both), **timing),
            decoder(both)[1].nbytes(),
        ),
        Row(
            length,
            "session",
            cache_ms,
            1000 * median_seconds(lambda: decoder(query, cache), **timing),
            cache.nbytes(),
        ),
    ]


def table(rows: list[Row]) -> str:
    headers = ["context", "way", "once ms", "query ms", "query vs resend", "state bytes"]
    resend = {row.context: row.query_ms for row in rows if row.way == "resend"}
    cells = [
        [
            f"{row.context:,}",
            row.way,
            f"{row.once_ms:.1f}",
            f"{row.query_ms:.2f}",
            f"{resend[row.context] / row.query_ms:.1f}x",
            f"{row.state_bytes:,}",
        ]
        for row in rows
    ]
    return format_table(headers, cells, left=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context-lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--query", type=int, default=16, help="tokens per query")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--memory-size", type=int, default=None, help="pooled slots (None: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for length in args.context_lengths:
        log(f"context of {length:,} tokens...")
        rows += measure(length, args)
    log(table(rows))
    payload = {
        "machine": machine_info(torch=torch.__version__, torch_threads=1),
        "settings": {k: v for k, v in vars(args).items() if k != "quick"},
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    log(f"wrote {write_json('encode.json', payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
