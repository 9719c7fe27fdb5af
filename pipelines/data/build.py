"""`build_datasets`: the one place that composes the pure generators with Ray Data.

A split's rows are planned in chunks of about `CHUNK_TOKENS` tokens (every part in proportion, a
seed per chunk, a separate seed stream per split). One `map_batches` task per chunk of either
split, one per CPU of the cluster at a time, generates it with whole-array numpy code (no per-row
Python) and writes it once as a Parquet file in the compact layout of `layout.py`, under
`cache_dir/<hash of the data config>/`; the driver follows their progress. The files are read
back as Ray Datasets for `TorchTrainer(datasets=...)` and `ray.train.get_dataset_shard`. The cache
is filled in a temporary directory and renamed into place, so a crash leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from pydantic import TypeAdapter

from pipelines.data.config import DataConfig, Strict, SyntheticTask, TaskConfig, TextTask
from pipelines.data.errors import DataError
from pipelines.data.layout import to_table, token_dtype
from pipelines.data.tasks import generate_part
from pipelines.data.tasks.common import Batch, apportion, block_seed, row_hashes, split_evenly
from pipelines.data.text import Corpus, block_slices, load_corpus, stream_rows

# Bump when the on-disk layout or a generator's output changes, to invalidate old caches.
# 3: exact sequential power-law gaps; compact token rows per part, no padding; lz4 Parquet.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
# Rows are drawn in chunks of about this many tokens, each with its own seed; one chunk is one
# Parquet file and one Ray Data block (16 MB of int16 inputs and labels). Part of the format: the
# chunk boundaries decide the seeds, so the data does not depend on how many tasks make it.
CHUNK_TOKENS = 1 << 22
# lz4 without dictionaries or column statistics (useless on token rows): the fastest Parquet
# write and read measured on these blocks, at a fifth more bytes than zstd (bench_data.py).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "lz4",
    "use_dictionary": False,
    "write_statistics": False,
}
# Fractional CPUs keep data tasks schedulable next to Train workers on small machines.
_TASK_CPUS = 0.5
_SPLITS = {"train": 0, "test": 1}
_TASK_ADAPTER: TypeAdapter[TaskConfig] = TypeAdapter(TaskConfig)

Progress = Callable[[str], None]


class Manifest(Strict):
    """What was written, stored beside the Parquet files; the cache counts as complete with it."""

    key: str
    format_version: int
    config: DataConfig
    vocab_size: int
    token_dtype: str
    train_rows: int
    test_rows: int
    dropped_test_rows: int
    train_seq_len: int
    test_seq_len: int
    bytes: int
    seconds: float

    @property
    def examples_per_second(self) -> float:
        """Rows generated (kept or dropped) per second of writing the cache."""
        rows = self.train_rows + self.test_rows + self.dropped_test_rows
        return rows / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class PreparedData:
    """Train and test Ray Datasets, read from the cache on first use.

    Rows: `inputs`, `labels` (intN token bytes, each part at its own length), `part` and the
    task's metadata (`pipelines.data.layout`); read batches of one part with `shard_batches`.
    """

    vocab_size: int
    metadata: Manifest
    path: Path
    cached: bool

    @cached_property
    def train(self) -> ray.data.Dataset:
        return _read_split(self.path / "train")

    @cached_property
    def test(self) -> ray.data.Dataset:
        return _read_split(self.path / "test")

    def datasets(self) -> dict[str, ray.data.Dataset]:
        """For `TorchTrainer(datasets=...)`; workers read theirs with `get_dataset_shard`."""
        return {"train": self.train, "test": self.test}


def build_datasets(config: DataConfig, progress: Progress | None = None) -> PreparedData:
    """Prepare (or reuse) the data for `config`; all checks run before any Ray work."""
    path, cached = fill_cache(config, progress)
    manifest = Manifest.model_validate_json((path / MANIFEST).read_text())
    return PreparedData(vocab_size=manifest.vocab_size, metadata=manifest, path=path, cached=cached)


def fill_cache(config: DataConfig, progress: Progress | None = None) -> tuple[Path, bool]:
    """Write the data for `config` to its cache folder unless it is there; read nothing back.

    Returns `(folder, cached)`. A sweep calls this once before its trials, which then only read.
    """
    say = progress or (lambda _message: None)
    config.check()
    corpus = load_corpus(config.task, config.seed) if isinstance(config.task, TextTask) else None
    key = cache_key(config, corpus.fingerprint if corpus else "")
    path = config.cache_dir / key
    cached = (path / MANIFEST).is_file()
    if cached:
        say(f"reusing cached data at {path}")
    else:
        _write_atomically(path, lambda scratch: _fill(config, corpus, key, scratch, say))
    return path, cached


def _read_split(folder: Path) -> ray.data.Dataset:
    """One cached split, read in this process and handed to Ray Data as Arrow blocks (one per file).

    Not `ray.data.read_parquet`: its datasource starts a pool of footer-reader actors (32 worker
    processes by default) every time a dataset is executed, once per epoch and split, which on a
    2-core machine cost more than training a small model and stalled Tune trials for minutes. And
    on a multi-node cluster the workers could not see this node's cache folder; blocks in the object
    store reach every node. The cached data sets are small (synthetic tasks, a capped corpus).
    Past the Parquet decode nothing copies the tokens: the tables go into the object store as
    Arrow buffers, and `shard_batches` views them as numpy arrays.
    """
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"the data cache {folder} holds no Parquet files; delete it to rebuild")
    return ray.data.from_arrow([pq.read_table(file) for file in files])


def cache_key(config: DataConfig, fingerprint: str = "") -> str:
    """Hash of everything that decides the data: the config (not where it is cached, nor how
    many tasks make it), the corpus bytes for text, and the format version."""
    payload = config.model_dump(mode="json", exclude={"cache_dir", "blocks"})
    payload |= {"corpus": fingerprint, "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        fill(scratch)
        try:
            os.rename(scratch, path)
        except OSError:
            # Another run finished the same data first; theirs is complete, so keep it.
            if not (path / MANIFEST).is_file():
                raise
            shutil.rmtree(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _fill(
    config: DataConfig, corpus: Corpus | None, key: str, scratch: Path, say: Progress
) -> None:
    started = time.perf_counter()
    if corpus is None:
        dropped = _write_synthetic(config, scratch, say)
    else:
        _write_text(config, corpus, scratch, say)
        dropped = 0
    seconds = time.perf_counter() - started
    train_rows, train_bytes = _split_stats(scratch / "train")
    test_rows, test_bytes = _split_stats(scratch / "test")
    if test_rows == 0:
        raise DataError(
            "every test row also occurs in the training set: the task has too few distinct "
            "examples; raise task.vocab_size or the sequence lengths, or lower the counts"
        )
    test_task = config.task if corpus is not None else config.task.test_task()
    manifest = Manifest(
        key=key,
        format_version=FORMAT_VERSION,
        config=config,
        vocab_size=config.task.vocab_size,
        token_dtype=token_dtype(config.task.vocab_size).name,
        train_rows=train_rows,
        test_rows=test_rows,
        dropped_test_rows=dropped,
        train_seq_len=config.task.row_width,
        test_seq_len=test_task.row_width,
        bytes=train_bytes + test_bytes,
        seconds=seconds,
    )
    made = train_rows + test_rows + dropped
    say(f"wrote {made:,} examples at {manifest.examples_per_second:,.0f} examples/s")
    (scratch / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def _write_synthetic(config: DataConfig, scratch: Path, say: Progress) -> int:
    """Both splits in one pass of `map_batches` tasks, one per chunk, `config.blocks` (None:
    one per CPU of the cluster) at a time; then the test rows whose hash occurs in train are
    dropped. Returns the rows dropped."""
    task = config.task
    assert not isinstance(task, TextTask)
    splits = {
        "train": (task, plan_chunks(task, config.num_train_examples)),
        "test": (task.test_task(), plan_chunks(task.test_task(), config.num_test_examples)),
    }
    items = [
        {"split": split, "chunk": chunk}
        for split, (_, chunks) in splits.items()
        for chunk in range(len(chunks))
    ]
    for split in splits:
        (scratch / split).mkdir(parents=True)
    dataset = _task_per_item(
        items,
        _write_chunk,
        config.blocks,
        {
            "tasks": {split: spec.model_dump(mode="json") for split, (spec, _) in splits.items()},
            "chunks": {split: chunks for split, (_, chunks) in splits.items()},
            "seed": config.seed,
            "folder": str(scratch),
        },
    )
    totals = {"train": config.num_train_examples, "test": config.num_test_examples}
    _follow(dataset, totals, say)
    return _drop_repeats(scratch)


def plan_chunks(task: SyntheticTask, num_examples: int) -> list[tuple[int, ...]]:
    """Rows per part in each chunk: the split's rows apportioned to the parts by weight, then
    each part spread evenly over chunks of about `CHUNK_TOKENS` tokens, so every chunk (and
    block) holds every part in proportion."""
    counts = apportion(num_examples, task.part_weights())
    lengths = [task.part_seq_len(part) for part in task.part_list()]
    tokens = sum(count * length for count, length in zip(counts, lengths, strict=True))
    chunks = max(1, min(num_examples, -(-tokens // CHUNK_TOKENS)))
    spread = [split_evenly(count, chunks) for count in counts]
    return [tuple(column[chunk] for column in spread) for chunk in range(chunks)]


def _write_chunk(
    batch: Batch,
    *,
    tasks: dict[str, dict[str, object]],
    chunks: dict[str, list[tuple[int, ...]]],
    seed: int,
    folder: str,
) -> Batch:
    """One Ray task: one chunk of one split generated, hashed and written as one Parquet file;
    returns its split, rows and bytes. The task config crosses as a dict and is validated again
    here."""
    split, chunk = str(batch["split"][0]), int(batch["chunk"][0])
    config = _TASK_ADAPTER.validate_python(tasks[split])
    assert not isinstance(config, TextTask)
    rng = np.random.default_rng(block_seed(seed, _SPLITS[split], chunk))
    pieces, parts = [], []
    for index, (part, count) in enumerate(
        zip(config.part_list(), chunks[split][chunk], strict=True)
    ):
        if count:
            rows = generate_part(config, part, count, rng)
            rows["row_hash"] = row_hashes(rows)
            pieces.append(rows)
            parts.append(index)
    table = to_table(pieces, parts, token_dtype(config.vocab_size))
    path = Path(folder) / split / f"{chunk:05d}.parquet"
    pq.write_table(table, path, **PARQUET_OPTIONS)
    return _stats(split, table.num_rows, path)


def _drop_repeats(scratch: Path) -> int:
    """Rewrite the test files without rows whose hash occurs in train; returns rows dropped.

    In the driver: it needs all of train's hashes (one int64 column) and touches only the small
    test split, and only files that hold a repeat (never, but for tiny vocabularies)."""
    seen = pq.read_table(scratch / "train", columns=["row_hash"])["row_hash"].to_numpy()
    dropped = 0
    for path in sorted((scratch / "test").glob("*.parquet")):
        table = pq.read_table(path)
        repeats = np.isin(table["row_hash"].to_numpy(), seen)
        if repeats.any():
            dropped += int(repeats.sum())
            pq.write_table(table.filter(pa.array(~repeats)), path, **PARQUET_OPTIONS)
    return dropped


def _stats(split: str, rows: int, path: Path) -> Batch:
    return {
        "split": np.array([split]),
        "rows": np.array([rows]),
        "bytes": np.array([path.stat().st_size]),
    }


def _follow(dataset: ray.data.Dataset, totals: dict[str, int], say: Progress) -> None:
    """Run the writing tasks, reporting rows written per split and examples/s as chunks finish."""
    started = time.perf_counter()
    written = dict.fromkeys(totals, 0)
    say(", ".join(f"{split}: generating {total:,} examples" for split, total in totals.items()))
    for stats in dataset.iter_rows():
        written[stats["split"]] += int(stats["rows"])
        rate = sum(written.values()) / max(time.perf_counter() - started, 1e-9)
        done = ", ".join(f"{split} {written[split]:,}/{totals[split]:,}" for split in totals)
        say(f"rows written: {done} ({rate:,.0f} examples/s)")


def _task_per_item(
    items: list[dict[str, Any]],
    write: Callable[..., Any],
    blocks: int | None,
    fn_kwargs: dict[str, Any],
) -> ray.data.Dataset:
    """A lazy dataset that calls `write(batch_of_one_item, **fn_kwargs)` once per item, one item
    per block, at most `blocks` tasks at a time (default: the cluster's CPUs), each asking for
    `_TASK_CPUS`."""
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        write,
        batch_size=1,
        num_cpus=_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=min(len(items), blocks or _cluster_cpus())),
        fn_kwargs=fn_kwargs,
    )


def _cluster_cpus() -> int:
    """Logical CPUs of the Ray cluster: more tasks at once would only start more processes."""
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def _write_text(config: DataConfig, corpus: Corpus, scratch: Path, say: Progress) -> None:
    task = config.task
    assert isinstance(task, TextTask)
    items, totals = [], {}
    for split, stream in (("train", corpus.train), ("test", corpus.validation)):
        totals[split] = (len(stream) - 1) // task.stream_len
        chunks = -(-totals[split] * task.stream_len // CHUNK_TOKENS)
        pieces = block_slices(stream, task.stream_len, chunks)
        items += [
            {"split": split, "chunk": index, "first_row": first, "piece": piece}
            for index, (first, piece) in enumerate(pieces)
        ]
        (scratch / split).mkdir(parents=True)
    dataset = _task_per_item(
        items, _text_block, config.blocks, {"stream_len": task.stream_len, "folder": str(scratch)}
    )
    _follow(dataset, totals, say)


def _text_block(batch: Batch, *, stream_len: int, folder: str) -> Batch:
    split = str(batch["split"][0])
    rows = stream_rows(bytes(batch["piece"][0]), stream_len, int(batch["first_row"][0]))
    table = to_table([rows], [0], token_dtype(TextTask().vocab_size))
    path = Path(folder) / split / f"{int(batch['chunk'][0]):05d}.parquet"
    pq.write_table(table, path, **PARQUET_OPTIONS)
    return _stats(split, table.num_rows, path)


def _split_stats(path: Path) -> tuple[int, int]:
    """(rows, bytes) of one split's Parquet files, from their footers."""
    files = sorted(path.glob("*.parquet"))
    rows = sum(pq.read_metadata(file).num_rows for file in files)
    return rows, sum(file.stat().st_size for file in files)
