"""Queries/s and recall@k of the retrieval memory's indexes: exact torch top-k against faiss.

The `retrieval` layer searches its store with `memory_models.knn_index`: `ExactIndex` (torch
matmul + topk, the default) or `FaissIndex` (HNSW by default; also IVF and faiss's exact flat
index). This script measures those indexes alone on one store of N unit-length keys of width 64
(random directions, the hardest case for an approximate index: the neighbours of a random query
are barely closer than the rest), queried by independent random unit queries:

* build s: seconds to build the index (none for torch; a copy for flat); the layer rebuilds its
  faiss index at every call, so this is paid per call there;
* queries/s: top-k search throughput once built (median of repeats);
* recall@k: the fraction of the exact top-k ids that the index returns.

HNSW is built only up to `--hnsw-max-entries` (its single-thread build grows a little faster
than N: over a minute at 10^5, many at 10^6). The default sizes, 10^4 and 10^5, take about three
minutes; `--entries 1000000 --queries 200` adds 10^6 (exact, flat and IVF) in about five more.
Run from the repository root: `.venv/bin/python benchmarks/bench_retrieval.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time

import numpy as np
import torch
from bench_common import (
    add_timing_options,
    format_table,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    write_results,
)
from torch import Tensor

from memory_models.knn_index import ExactIndex, FaissIndex, import_faiss

# A tiny size that exercises every code path in seconds; explicit options still override it.
QUICK = {"entries": [2_000, 10_000], "queries": 200, "repeats": 1}
NOTE = (
    "Keys and queries: independent random unit vectors (seed 0). queries/s excludes building; "
    "build s is what the layer pays per call with index='faiss'. recall@k against exact torch "
    "top-k. flat = faiss IndexFlatIP (exact; float32 rounding may swap near-tied neighbours). "
    "hnsw: M={neighbors}, efConstruction={ef_construction}, efSearch={ef_search}. "
    "ivf: min(sqrt(N), N/39) lists, nprobe={probes}."
)
# Queries per torch matmul: bounds the [queries, N] score matrix to ~256 MB at N = 10^6.
EXACT_QUERY_BATCH = 64


@dataclasses.dataclass(frozen=True)
class IndexRow:
    entries: int
    method: str
    build_seconds: float
    queries_per_s: float
    recall_at_k: float


def unit_vectors(count: int, dim: int, generator: torch.Generator) -> Tensor:
    vectors = torch.randn(count, dim, generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True)


def exact_search(keys: Tensor, queries: Tensor, k: int) -> Tensor:
    """Exact top-k ids `[Q, k]` with `ExactIndex`, a batch of queries at a time."""
    index, valid = ExactIndex(), torch.ones(1, keys.shape[0], dtype=torch.bool)
    found = [
        index.search(keys[None], valid, batch[None], k)[1][0]
        for batch in queries.split(EXACT_QUERY_BATCH)
    ]
    return torch.cat(found)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    hits = [len(set(row) & set(truth)) for row, truth in zip(found, exact, strict=True)]
    return sum(hits) / exact.size


def measure_faiss(
    method: str, keys: Tensor, queries: Tensor, exact: np.ndarray, args: argparse.Namespace
) -> IndexRow:
    index = FaissIndex(
        method,
        neighbors=args.neighbors,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        probes=args.probes,
    )
    keys_np, queries_np = keys.numpy(), queries.numpy()
    start = time.perf_counter()
    built = index.build(keys_np)
    build_seconds = time.perf_counter() - start
    seconds = median_seconds(
        lambda: index.query(built, queries_np, args.k), args.warmup, args.repeats
    )
    _, found = index.query(built, queries_np, args.k)
    return IndexRow(
        keys.shape[0],
        f"faiss {method}",
        build_seconds,
        len(queries) / seconds,
        recall(found, exact),
    )


def measure_size(entries: int, args: argparse.Namespace) -> list[IndexRow]:
    generator = torch.Generator().manual_seed(0)
    keys = unit_vectors(entries, args.dim, generator)
    queries = unit_vectors(args.queries, args.dim, generator)
    seconds = median_seconds(lambda: exact_search(keys, queries, args.k), args.warmup, args.repeats)
    exact = exact_search(keys, queries, args.k).numpy()
    rows = [IndexRow(entries, "exact torch", 0.0, args.queries / seconds, 1.0)]
    log(f"  exact torch  {rows[-1].queries_per_s:12,.0f} queries/s")
    methods = ["flat", "ivf"] + (["hnsw"] if entries <= args.hnsw_max_entries else [])
    for method in methods:
        rows.append(measure_faiss(method, keys, queries, exact, args))
        row = rows[-1]
        log(
            f"  {row.method:<12} {row.queries_per_s:12,.0f} queries/s, recall@{args.k} "
            f"{row.recall_at_k:.3f}, build {row.build_seconds:.2f} s"
        )
    return rows


def table(rows: list[IndexRow], k: int) -> str:
    headers = ["entries", "method", "build s", "queries/s", f"recall@{k}"]
    cells = [
        [
            f"{row.entries:,}",
            row.method,
            f"{row.build_seconds:.2f}",
            f"{row.queries_per_s:,.0f}",
            f"{row.recall_at_k:.3f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells, left=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--entries", type=int, nargs="+", default=[10_000, 100_000], help="store sizes"
    )
    parser.add_argument("--dim", type=int, default=64, help="key width")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=8, help="neighbours per query (top_k)")
    parser.add_argument("--neighbors", type=int, default=32, help="HNSW links per node (M)")
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--probes", type=int, default=16, help="IVF lists searched (nprobe)")
    parser.add_argument("--hnsw-max-entries", type=int, default=100_000)
    add_timing_options(parser, repeats=3, threads="torch and faiss threads", warmup=1)
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faiss = import_faiss()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    log(f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} thread(s)")
    rows = []
    for entries in args.entries:
        log(f"{entries:,} entries of width {args.dim}, {args.queries:,} queries, k={args.k}")
        rows.extend(measure_size(entries, args))
    note = NOTE.format(**vars(args))
    log("")
    log(table(rows, args.k))
    log(textwrap.fill(note, width=100))
    write_results(
        "retrieval.json",
        machine_info(torch=torch.__version__, faiss=faiss.__version__, threads=args.threads),
        {name: value for name, value in vars(args).items() if name != "quick"},
        rows,
        note=note,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
