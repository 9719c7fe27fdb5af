"""Throughput of data preparation: the task generators, the text path and the Ray Data pipeline.

1. Generators: examples/s of one vectorised call against a per-example loop that calls the same
   generator with `num_examples=1` and a fresh seed each time, cycling through the task's length
   buckets (one single-bucket config each), so both sides make the same mix of row lengths.
2. Text: reading and splitting the corpus, then cutting it into rows, in bytes/s.
3. Where the pipeline's time goes: CPU seconds of each stage for one task's rows on one thread
   (generate, hash, to Arrow, Parquet write, Parquet read, batches of one part), and the Parquet
   codecs measured on one stored block, which is how the cache's codec was chosen.
4. The Ray Data pipeline before and after, side by side in one run: for each version (the
   `--baseline` commit, unpacked with `git archive` into a temporary folder, and this tree) a
   fresh process starts a local Ray, measures its own per-example generator, then times
   `fill_cache` (generate and write the Parquet cache) and reading it back as Ray Datasets, after
   one untimed warm-up build (Ray's worker processes start once per session, not per build).
   The per-example generator is timed in CPU seconds, the pipeline in wall seconds (it spans
   processes), so a busy machine lowers the ratio, never raises it. A shared machine's load makes
   wall seconds noisy, so the pipeline's CPU seconds (all of the Ray session's processes: GCS,
   raylet, workers, driver) are reported too, and the CPU ratio (examples per CPU second,
   pipeline over per-example generator) compares the two on work done, whatever the load.
   The target (issue 15): pipeline examples/s >= 10x the per-example generator at >= 100k rows.

Run from the repository root: `.venv/bin/python benchmarks/bench_data.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_common import (
    format_table,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    write_json,
)
from pydantic import TypeAdapter

from pipelines.data.batches import part_batches
from pipelines.data.build import PARQUET_OPTIONS, plan_chunks
from pipelines.data.config import TaskConfig, TextTask
from pipelines.data.layout import part_runs, to_table, token_dtype
from pipelines.data.tasks import GENERATORS, generate_part
from pipelines.data.tasks.common import block_seed, row_hashes
from pipelines.data.text import load_corpus, stream_rows

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the compact Parquet pipeline and the exact power-law gaps.
BASELINE_REF = "6960926"
QUICK = {
    "examples": 2000,
    "ref_examples": 100,
    "repeats": 1,
    "text_max_bytes": 1_000_000,
    "pipeline_examples": 4000,
    "pipeline_repeats": 1,
    "profile_examples": 4000,
}
NOTE = (
    "ratio = vectorised examples/s / per-example examples/s, both on one Python thread (numpy; "
    "torch is not used). The per-example loop calls the generator once per example "
    "(num_examples=1, distinct seeds), cycling through the task's length buckets."
)
_BARE = {"use_dictionary": False, "write_statistics": False}
CODECS: dict[str, dict[str, Any]] = {
    "snappy (pyarrow default)": {"compression": "snappy"},
    "none": {"compression": "none"},
    "zstd-1": {"compression": "zstd", "compression_level": 1},
    "lz4": {"compression": "lz4"},
    "none, bare": {"compression": "none", **_BARE},
    "snappy, bare": {"compression": "snappy", **_BARE},
    "zstd-1, bare": {"compression": "zstd", "compression_level": 1, **_BARE},
    "zstd-3, bare": {"compression": "zstd", "compression_level": 3, **_BARE},
    "lz4, bare (the cache's)": PARQUET_OPTIONS,
}
CODEC_NOTE = (
    "bare = no dictionary, no column statistics. 'as list<intN>': the same block with token "
    "columns as Arrow lists, which Parquet encodes with a repetition level per token."
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


@dataclasses.dataclass(frozen=True)
class StageRow:
    stage: str
    cpu_seconds: float
    examples_per_cpu_second: float


@dataclasses.dataclass(frozen=True)
class CodecRow:
    codec: str
    megabytes: float
    write_cpu_seconds: float
    read_cpu_seconds: float


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


def measure_task(kind: str, args: argparse.Namespace) -> TaskRow:
    generate, config = GENERATORS[kind], default_config(kind)
    fast = vectorised_rate(generate, config, args)
    log(f"  vectorised   {fast:12,.0f} examples/s  ({args.examples} per call)")
    slow = per_example_rate(generate, config, args)
    log(f"  per-example  {slow:12,.0f} examples/s  ({args.ref_examples} calls)")
    return TaskRow(kind, config.row_width, fast, slow, fast / slow)


def measure_text(args: argparse.Namespace) -> list[TextRow]:
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


def cpu_seconds(run: Callable[[], object]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


class StageClock:
    """CPU seconds added up per named stage."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.process_time()
        yield
        self.spent[name] += time.process_time() - start


def measure_stages(kind: str, examples: int, seed: int) -> tuple[list[StageRow], pa.Table]:
    """CPU seconds per stage of the cache's path for `examples` rows of `kind`, one thread."""
    task = default_config(kind)
    dtype = token_dtype(task.vocab_size)
    clock = StageClock()
    tables = []
    with tempfile.TemporaryDirectory() as folder:
        for index, counts in enumerate(plan_chunks(task, examples)):
            rng = np.random.default_rng(block_seed(seed, 0, index))
            pieces = []
            for part, count in zip(task.part_list(), counts, strict=True):
                with clock.stage("generate_part"):
                    rows = generate_part(task, part, count, rng)
                with clock.stage("row_hashes"):
                    rows["row_hash"] = row_hashes(rows)
                pieces.append(rows)
            with clock.stage("to_table (int16 rows)"):
                table = to_table(pieces, range(len(pieces)), dtype)
            path = Path(folder) / f"{index}.parquet"
            with clock.stage("parquet write"):
                pq.write_table(table, path, **PARQUET_OPTIONS)
            with clock.stage("parquet read"):
                tables.append(pq.read_table(path))
    with clock.stage("batches of one part (256)"):
        for _ in part_batches(tables, 256, seed=seed, drop_last=True):
            pass
    rows = [StageRow(stage, s, examples / max(s, 1e-9)) for stage, s in clock.spent.items()]
    return rows, tables[0]


def measure_codecs(table: pa.Table) -> list[CodecRow]:
    """Bytes, write and read CPU seconds (best of 3) of one stored block per codec, and of the
    same block with list token columns under the cache's options."""
    rows = []
    candidates = [(name, table, options) for name, options in CODECS.items()]
    candidates.append(("lz4, bare, as list<intN>", as_lists(table), PARQUET_OPTIONS))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "block.parquet"
        for name, block, options in candidates:
            write = min(
                cpu_seconds(partial(pq.write_table, block, path, **options)) for _ in range(3)
            )
            read = min(cpu_seconds(partial(pq.read_table, path)) for _ in range(3))
            rows.append(CodecRow(name, path.stat().st_size / 1e6, write, read))
    return rows


def as_lists(table: pa.Table) -> pa.Table:
    """The block with its token columns as `list<intN>` (rows of one part each run)."""
    columns = {}
    for name in table.column_names:
        columns[name] = table[name].combine_chunks()
        if name in ("inputs", "labels"):
            runs = [rows[name] for _, rows in part_runs(table)]
            widths = np.concatenate([np.full(len(run), run.shape[1]) for run in runs])
            offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
            values = np.concatenate([run.ravel() for run in runs])
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(columns)


# Runs in a fresh process against one version of the code (this tree or the baseline's), so
# both are measured by the same lines; it uses only APIs both versions have.
PIPELINE_SCRIPT = """
import json, os, sys, tempfile, time
from pathlib import Path
import glob, math
import ray, ray.data
from pydantic import TypeAdapter
from pipelines.data.build import build_datasets, fill_cache
from pipelines.data.config import DataConfig, TaskConfig
from pipelines.data.tasks import GENERATORS
settings = json.loads(sys.argv[1])
kind, seed = settings["kind"], settings["seed"]
task = TypeAdapter(TaskConfig).validate_python({"kind": kind})
field = "parts" if "parts" in type(task).model_fields else "lengths"
buckets = [task.model_copy(update={field: (b,)}) for b in getattr(task, field)]
generate = GENERATORS[kind]
for index in range(settings["ref_examples"] // 10):  # warm-up: lazy set-up, caches
    generate(buckets[index % len(buckets)], 1, seed + index)
start = time.process_time()  # CPU time: a busy machine slows the wall clock, not this
for index in range(settings["ref_examples"]):
    generate(buckets[index % len(buckets)], 1, seed + index)
per_example = settings["ref_examples"] / (time.process_time() - start)
def session_cpu():
    # CPU seconds of this process and its descendants (Ray's GCS, raylet and workers), from
    # /proc (Linux): utime and stime, fields 14 and 15 of /proc/PID/stat.
    if not os.path.isdir("/proc"):
        return math.nan
    parent, ticks = {}, {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(path).read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(path.split("/")[2])
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    family, grew = {os.getpid()}, True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= children
        grew = bool(children)
    return sum(ticks.get(pid, 0) for pid in family) / os.sysconf("SC_CLK_TCK")
ray.init(num_cpus=settings["cpus"], include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
runs = []
for repeat in range(settings["repeats"] + 1):
    with tempfile.TemporaryDirectory() as folder:
        config = DataConfig(task=task, cache_dir=Path(folder), seed=seed,
                            num_train_examples=settings["examples"],
                            num_test_examples=settings["test_examples"], **settings["extra"])
        load = os.getloadavg()[0]
        cpu = session_cpu()
        start = time.perf_counter()
        fill_cache(config)
        written = time.perf_counter()
        prepared = build_datasets(config)
        rows = prepared.train.count() + prepared.test.count()
        done = time.perf_counter()
        runs.append({"write_s": written - start, "read_s": done - written, "rows": rows,
                     "cpu_s": session_cpu() - cpu, "load_average": load,
                     "bytes": prepared.metadata.bytes})
ray.shutdown()
print("RESULT " + json.dumps({"per_example": per_example, "runs": runs[1:]}))
"""


@dataclasses.dataclass(frozen=True)
class PipelineRow:
    version: str
    kind: str
    examples: int
    write_seconds: float
    read_seconds: float
    pipeline_examples_per_s: float
    per_example_examples_per_s: float
    ratio: float
    pipeline_examples_per_cpu_s: float
    cpu_ratio: float
    megabytes: float
    load_average: float


def baseline_tree(ref: str, folder: Path) -> Path | None:
    """The baseline commit's files under `folder` (`git archive`), or None without git/ref."""
    archive = folder / "baseline.tar"
    done = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], capture_output=True
    )
    if done.returncode != 0:
        log(f"  no baseline: git archive {ref} failed: {done.stderr.decode().strip()}")
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def measure_pipeline(version: str, root: Path, kind: str, args: argparse.Namespace) -> PipelineRow:
    settings = {
        "kind": kind,
        "seed": args.seed,
        "ref_examples": args.ref_examples,
        "cpus": 2 * (os.cpu_count() or 1),
        "repeats": args.pipeline_repeats,
        "examples": args.pipeline_examples,
        "test_examples": max(64, args.pipeline_examples // 20),
        # The baseline as shipped (8 blocks); this tree sizes its tasks to the cluster.
        "extra": {"blocks": 8} if version == "before" else {},
    }
    env = os.environ | {"PYTHONPATH": str(root), "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(settings)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{version} pipeline run failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    runs = result["runs"]
    write = float(np.median([run["write_s"] for run in runs]))
    read = float(np.median([run["read_s"] for run in runs]))
    rate = runs[0]["rows"] / (write + read)
    per_cpu = runs[0]["rows"] / float(np.median([run["cpu_s"] for run in runs]))
    per_example = result["per_example"]
    log(f"  {version}: write {write:.2f}s, read {read:.2f}s, {rate:,.0f} examples/s")
    return PipelineRow(
        version,
        kind,
        runs[0]["rows"],
        write,
        read,
        rate,
        per_example,
        rate / per_example,
        per_cpu,
        per_cpu / per_example,
        runs[0]["bytes"] / 1e6,
        float(np.mean([run["load_average"] for run in runs])),
    )


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


def stage_table(rows: list[StageRow]) -> str:
    total = sum(row.cpu_seconds for row in rows)
    cells = [
        [
            row.stage,
            f"{row.cpu_seconds:.3f}",
            f"{100 * row.cpu_seconds / total:.0f}%",
            f"{row.examples_per_cpu_second:,.0f}",
        ]
        for row in rows
    ]
    return format_table(["stage (one thread)", "CPU s", "share", "ex per CPU s"], cells)


def codec_table(rows: list[CodecRow]) -> str:
    cells = [
        [
            row.codec,
            f"{row.megabytes:.1f}",
            f"{row.write_cpu_seconds:.3f}",
            f"{row.read_cpu_seconds:.3f}",
        ]
        for row in rows
    ]
    return format_table(["Parquet codec (one block)", "MB", "write CPU s", "read CPU s"], cells)


def pipeline_table(rows: list[PipelineRow]) -> str:
    headers = ["version", "task", "examples", "write s", "read s", "pipeline ex/s"]
    headers += ["per-example ex/CPU s", "ratio", "pipeline ex/CPU s", "CPU ratio", "MB", "load"]
    cells = [
        [
            row.version,
            row.kind,
            f"{row.examples:,}",
            f"{row.write_seconds:.2f}",
            f"{row.read_seconds:.2f}",
            f"{row.pipeline_examples_per_s:,.0f}",
            f"{row.per_example_examples_per_s:,.0f}",
            f"{row.ratio:.1f}x",
            f"{row.pipeline_examples_per_cpu_s:,.0f}",
            f"{row.cpu_ratio:.1f}x",
            f"{row.megabytes:.1f}",
            f"{row.load_average:.1f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells, left=2)


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
    parser.add_argument("--profile-examples", type=int, default=100_000, help="rows per profile")
    parser.add_argument(
        "--pipeline-examples", type=int, default=100_000, help="train rows per Ray Data build"
    )
    parser.add_argument("--pipeline-repeats", type=int, default=2, help="timed builds (median)")
    parser.add_argument("--pipeline-kinds", nargs="+", choices=list(GENERATORS), default=["mqar"])
    parser.add_argument(
        "--baseline", default=BASELINE_REF, help="git ref of the 'before' pipeline ('' to skip)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return parse_with_quick(parser, argv, QUICK)


def run_pipelines(args: argparse.Namespace) -> list[PipelineRow]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        before = baseline_tree(args.baseline, Path(folder)) if args.baseline else None
        for kind in args.pipeline_kinds:
            log(f"[pipeline] {kind}: {args.pipeline_examples:,} train rows, fresh cache per build")
            if before is not None:
                rows.append(measure_pipeline("before", before, kind, args))
            rows.append(measure_pipeline("after", ROOT, kind, args))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kinds = args.kinds or list(GENERATORS)
    log(f"numpy {np.__version__}, one Python thread; {vars(args)}")
    tasks = []
    for index, kind in enumerate(kinds, start=1):
        log(f"[{index}/{len(kinds)}] {kind}")
        tasks.append(measure_task(kind, args))
    log(f"[text] standard-library corpus, max_bytes={args.text_max_bytes:,}")
    text = measure_text(args)
    log(f"[profile] mqar, {args.profile_examples:,} rows through the cache's stages")
    stages, block = measure_stages("mqar", args.profile_examples, args.seed)
    codecs = measure_codecs(block)
    pipeline = run_pipelines(args)
    log("")
    log(task_table(tasks))
    log(textwrap.fill(NOTE, width=100))
    log("")
    log(text_table(text))
    log("")
    log(stage_table(stages))
    log("")
    log(codec_table(codecs))
    log(textwrap.fill(CODEC_NOTE, width=100))
    log("")
    log(pipeline_table(pipeline))
    payload = {
        "machine": machine_info(numpy=np.__version__),
        "settings": vars(args),
        "note": NOTE,
        "tasks": [dataclasses.asdict(row) for row in tasks],
        "text": [dataclasses.asdict(row) for row in text],
        "stages": [dataclasses.asdict(row) for row in stages],
        "codec_note": CODEC_NOTE,
        "codecs": [dataclasses.asdict(row) for row in codecs],
        "pipeline": [dataclasses.asdict(row) for row in pipeline],
    }
    log(f"wrote {write_json('data.json', payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
