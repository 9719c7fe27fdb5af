"""Throughput of data preparation: synthetic task generators and the byte-level text path.

The task generators draw a whole batch with array operations instead of looping over examples
in Python, which is what lets `memlab prep` make data sets on the fly instead of downloading
them. This script measures what that design buys: examples/s of one vectorised call against a
per-example loop that calls the same generator with `num_examples=1` and a fresh seed each time.
The per-example loop cycles through the task's length buckets (one single-bucket config each), so
both sides make the same mix of row lengths; with `num_examples=1` a mixture config would always
give its first, shortest bucket. The text path (read and split the corpus, then cut the train
stream into rows) is reported in bytes/s; it has no per-example counterpart. Last, the whole
Ray Data pipeline (`build_datasets` into a fresh cache: parallel generation, Parquet, read back)
in examples/s, against the same per-example loop.

Run from the repository root: `.venv/bin/python benchmarks/bench_data.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from bench_common import (
    format_table,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    write_json,
)
from pydantic import TypeAdapter

from pipelines.data.build import build_datasets
from pipelines.data.config import DataConfig, TaskConfig, TextTask
from pipelines.data.tasks import GENERATORS
from pipelines.data.text import load_corpus, stream_rows

# Small enough for a smoke run in seconds; explicit options still override it.
QUICK = {
    "examples": 2000,
    "ref_examples": 100,
    "repeats": 1,
    "text_max_bytes": 1_000_000,
    "pipeline_examples": 4000,
}
NOTE = (
    "ratio = vectorised examples/s / per-example examples/s, both on one Python thread (numpy; "
    "torch is not used). The per-example loop calls the generator once per example "
    "(num_examples=1, distinct seeds), cycling through the task's length buckets."
)

Generate = Callable[[Any, int, int], Any]


@dataclasses.dataclass(frozen=True)
class TaskRow:
    kind: str
    row_width: int
    vectorised_examples_per_s: float
    per_example_examples_per_s: float
    ratio: float


@dataclasses.dataclass(frozen=True)
class TextRow:
    stage: str
    bytes: int
    bytes_per_s: float


def default_config(kind: str) -> Any:
    """The task's default config, found by its `kind` tag as the experiment config finds it."""
    return TypeAdapter(TaskConfig).validate_python({"kind": kind})


def single_bucket_configs(config: Any) -> list[Any]:
    """One config per length bucket of the task's mixture (`parts` or `lengths`)."""
    for field in ("parts", "lengths"):
        if field in type(config).model_fields:
            buckets = getattr(config, field)
            return [config.model_copy(update={field: (bucket,)}) for bucket in buckets]
    return [config]


def vectorised_rate(generate: Generate, config: Any, args: argparse.Namespace) -> float:
    """Examples/s of one call that makes `--examples` rows at once."""
    seconds = median_seconds(
        lambda: generate(config, args.examples, args.seed), args.warmup, args.repeats
    )
    return args.examples / seconds


def per_example_rate(generate: Generate, config: Any, args: argparse.Namespace) -> float:
    """Examples/s of a Python loop making `--ref-examples` rows one call at a time."""
    configs = single_bucket_configs(config)

    def loop() -> None:
        for index in range(args.ref_examples):
            generate(configs[index % len(configs)], 1, args.seed + index)

    return args.ref_examples / median_seconds(loop, args.warmup, args.repeats)


def measure_task(kind: str, args: argparse.Namespace, log: Callable[[str], None]) -> TaskRow:
    generate, config = GENERATORS[kind], default_config(kind)
    fast = vectorised_rate(generate, config, args)
    log(f"  vectorised   {fast:12,.0f} examples/s  ({args.examples} per call)")
    slow = per_example_rate(generate, config, args)
    log(f"  per-example  {slow:12,.0f} examples/s  ({args.ref_examples} calls)")
    return TaskRow(kind, config.row_width, fast, slow, fast / slow)


def measure_text(args: argparse.Namespace, log: Callable[[str], None]) -> list[TextRow]:
    """Bytes/s of reading and splitting the corpus, then of cutting the train stream into rows."""
    task = TextTask(max_bytes=args.text_max_bytes, stream_len=args.stream_len)
    corpus = load_corpus(task, args.seed)
    read_bytes = len(corpus.train) + len(corpus.validation)
    load_s = median_seconds(lambda: load_corpus(task, args.seed), args.warmup, args.repeats)
    log(f"  load_corpus  {read_bytes / load_s:12,.0f} bytes/s  ({read_bytes:,} bytes, warm cache)")
    rows_s = median_seconds(
        lambda: stream_rows(corpus.train, task.stream_len), args.warmup, args.repeats
    )
    log(f"  stream_rows  {len(corpus.train) / rows_s:12,.0f} bytes/s  (train split)")
    return [
        TextRow("load_corpus", read_bytes, read_bytes / load_s),
        TextRow("stream_rows", len(corpus.train), len(corpus.train) / rows_s),
    ]


@dataclasses.dataclass(frozen=True)
class PipelineRow:
    kind: str
    examples: int
    seconds: float
    pipeline_examples_per_s: float
    per_example_examples_per_s: float
    ratio: float


def measure_pipeline(kind: str, args: argparse.Namespace, per_example: float) -> PipelineRow:
    """`build_datasets` end to end on a local Ray, into a fresh cache: blocks generated in
    parallel, written to Parquet, read back as Ray Datasets; against the per-example loop."""
    config = DataConfig(
        task=default_config(kind),
        num_train_examples=args.pipeline_examples,
        num_test_examples=max(64, args.pipeline_examples // 20),
        blocks=args.pipeline_blocks,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory() as folder:
        config = config.model_copy(update={"cache_dir": Path(folder)})
        start = time.perf_counter()
        prepared = build_datasets(config)
        rows = prepared.train.count() + prepared.test.count()
        seconds = time.perf_counter() - start
    rate = rows / seconds
    return PipelineRow(kind, rows, seconds, rate, per_example, rate / per_example)


def pipeline_table(rows: list[PipelineRow]) -> str:
    headers = ["task", "examples", "seconds", "pipeline ex/s", "per-example ex/s", "ratio"]
    cells = [
        [
            row.kind,
            f"{row.examples:,}",
            f"{row.seconds:.1f}",
            f"{row.pipeline_examples_per_s:,.0f}",
            f"{row.per_example_examples_per_s:,.0f}",
            f"{row.ratio:.1f}x",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def task_table(rows: list[TaskRow]) -> str:
    headers = ["task", "row width", "vectorised ex/s", "per-example ex/s", "ratio"]
    cells = [
        [
            row.kind,
            str(row.row_width),
            f"{row.vectorised_examples_per_s:,.0f}",
            f"{row.per_example_examples_per_s:,.0f}",
            f"{row.ratio:.1f}x",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def text_table(rows: list[TextRow]) -> str:
    cells = [[row.stage, f"{row.bytes:,}", f"{row.bytes_per_s / 1e6:,.1f}"] for row in rows]
    return format_table(["text stage", "bytes", "MB/s"], cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TextTask()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="rows per vectorised call")
    parser.add_argument("--ref-examples", type=int, default=1_000, help="per-example calls")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=list(GENERATORS), help="default: all")
    parser.add_argument("--text-max-bytes", type=int, default=defaults.max_bytes)
    parser.add_argument("--stream-len", type=int, default=defaults.stream_len)
    parser.add_argument(
        "--pipeline-examples", type=int, default=100_000, help="train rows per Ray Data build"
    )
    parser.add_argument("--pipeline-blocks", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kinds = args.kinds or list(GENERATORS)
    log(f"numpy {np.__version__}, one Python thread; {vars(args)}")
    tasks = []
    for index, kind in enumerate(kinds, start=1):
        log(f"[{index}/{len(kinds)}] {kind}")
        tasks.append(measure_task(kind, args, log))
    log(f"[text] standard-library corpus, max_bytes={args.text_max_bytes:,}")
    text = measure_text(args, log)
    log("[pipeline] build_datasets on a local Ray (2 logical CPUs per core), fresh cache")
    ray.init(num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pipeline = [measure_pipeline(row.kind, args, row.per_example_examples_per_s) for row in tasks]
    ray.shutdown()
    log("")
    log(task_table(tasks))
    log(textwrap.fill(NOTE, width=100))
    log("")
    log(text_table(text))
    log("")
    log(pipeline_table(pipeline))
    payload = {
        "machine": machine_info(numpy=np.__version__),
        "settings": vars(args),
        "note": NOTE,
        "tasks": [dataclasses.asdict(row) for row in tasks],
        "text": [dataclasses.asdict(row) for row in text],
        "pipeline": [dataclasses.asdict(row) for row in pipeline],
    }
    log(f"wrote {write_json('data.json', payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
