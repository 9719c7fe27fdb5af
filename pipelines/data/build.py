"""`build_datasets`: the one place that composes the pure generators with Ray Data.

Blocks of examples are generated in parallel (a seed per block, a separate seed stream per
split), written once to Parquet under `cache_dir/<hash of the data config>/`, and read back as
Ray Datasets for `TorchTrainer(datasets=...)` and `ray.train.get_dataset_shard`. The cache is
filled in a temporary directory and renamed into place, so a crash leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.data
from pydantic import TypeAdapter

from pipelines.data.config import DataConfig, Strict, SyntheticTask, TaskConfig, TextTask
from pipelines.data.errors import DataError
from pipelines.data.tasks import generate
from pipelines.data.tasks.common import Batch, block_seed, row_hashes, split_evenly
from pipelines.data.text import Corpus, block_slices, load_corpus, stream_rows

# Bump when the on-disk layout or a generator's output changes, to invalidate old caches.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
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
    train_rows: int
    test_rows: int
    dropped_test_rows: int
    train_seq_len: int
    test_seq_len: int
    bytes: int


@dataclass(frozen=True)
class PreparedData:
    """Train and test Ray Datasets: `inputs`, `labels` (int64 `[T]` per row) and metadata."""

    train: ray.data.Dataset
    test: ray.data.Dataset
    vocab_size: int
    metadata: Manifest
    path: Path
    cached: bool

    def datasets(self) -> dict[str, ray.data.Dataset]:
        """For `TorchTrainer(datasets=...)`; workers read theirs with `get_dataset_shard`."""
        return {"train": self.train, "test": self.test}


def build_datasets(config: DataConfig, progress: Progress | None = None) -> PreparedData:
    """Prepare (or reuse) the data for `config`; all checks run before any Ray work."""
    path, cached = fill_cache(config, progress)
    manifest = Manifest.model_validate_json((path / MANIFEST).read_text())
    return PreparedData(
        train=_read_split(path / "train"),
        test=_read_split(path / "test"),
        vocab_size=manifest.vocab_size,
        metadata=manifest,
        path=path,
        cached=cached,
    )


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
    """
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"the data cache {folder} holds no Parquet files; delete it to rebuild")
    return ray.data.from_arrow([pq.read_table(file) for file in files])


def cache_key(config: DataConfig, fingerprint: str = "") -> str:
    """Hash of everything that decides the data: the config (not where it is cached), the
    corpus bytes for text, and the format version."""
    payload = config.model_dump(mode="json", exclude={"cache_dir"})
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
    if corpus is None:
        dropped = _write_synthetic(config, scratch, say)
    else:
        _write_text(config, corpus, scratch, say)
        dropped = 0
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
        train_rows=train_rows,
        test_rows=test_rows,
        dropped_test_rows=dropped,
        train_seq_len=config.task.row_width,
        test_seq_len=test_task.row_width,
        bytes=train_bytes + test_bytes,
    )
    (scratch / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def _write_synthetic(config: DataConfig, scratch: Path, say: Progress) -> int:
    """Train first; then test, dropping rows whose hash occurs in train. Returns rows dropped."""
    task = config.task
    assert not isinstance(task, TextTask)
    say(f"generating {config.num_train_examples:,} training examples")
    _generate_split(config, task, "train", config.num_train_examples, None, scratch / "train")
    train_hashes = pq.read_table(scratch / "train", columns=["row_hash"])["row_hash"].to_numpy()
    say(f"generating {config.num_test_examples:,} test examples")
    test_rows = _generate_split(
        config, task.test_task(), "test", config.num_test_examples, train_hashes, scratch / "test"
    )
    return config.num_test_examples - test_rows


def _generate_split(
    config: DataConfig,
    task: SyntheticTask,
    split: str,
    num_examples: int,
    exclude: np.ndarray | None,
    out: Path,
) -> int:
    counts = split_evenly(num_examples, min(config.blocks, num_examples))
    dataset = ray.data.range(len(counts), override_num_blocks=len(counts)).map_batches(
        _generate_block,
        batch_size=1,
        num_cpus=_TASK_CPUS,
        fn_kwargs={
            "task": task.model_dump(mode="json"),
            "seed": config.seed,
            "split": _SPLITS[split],
            "counts": counts,
            "exclude": exclude,
        },
    )
    dataset.write_parquet(str(out))
    return _split_stats(out)[0]


def _generate_block(
    batch: Batch,
    *,
    task: dict[str, object],
    seed: int,
    split: int,
    counts: list[int],
    exclude: np.ndarray | None,
) -> Batch:
    """One Ray task: the task config crosses as a dict and is validated again here."""
    block = int(batch["id"][0])
    config = _TASK_ADAPTER.validate_python(task)
    assert not isinstance(config, TextTask)
    rows = generate(config, counts[block], block_seed(seed, split, block))
    rows["row_hash"] = row_hashes(rows)
    if exclude is None:
        return rows
    keep = ~np.isin(rows["row_hash"], exclude)
    return {name: column[keep] for name, column in rows.items()}


def _write_text(config: DataConfig, corpus: Corpus, scratch: Path, say: Progress) -> None:
    task = config.task
    assert isinstance(task, TextTask)
    for split, stream in (("train", corpus.train), ("test", corpus.validation)):
        say(f"cutting {len(stream):,} {split} bytes into streams of {task.stream_len + 1}")
        pieces = block_slices(stream, task.stream_len, config.blocks)
        items = [{"first_row": first, "piece": piece} for first, piece in pieces]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _text_block,
            batch_size=1,
            num_cpus=_TASK_CPUS,
            fn_kwargs={"stream_len": task.stream_len},
        )
        dataset.write_parquet(str(scratch / split))


def _text_block(batch: Batch, *, stream_len: int) -> Batch:
    return stream_rows(bytes(batch["piece"][0]), stream_len, int(batch["first_row"][0]))


def _split_stats(path: Path) -> tuple[int, int]:
    """(rows, bytes) of one split's Parquet files, from their footers."""
    files = sorted(path.glob("*.parquet"))
    rows = sum(pq.read_metadata(file).num_rows for file in files)
    return rows, sum(file.stat().st_size for file in files)
