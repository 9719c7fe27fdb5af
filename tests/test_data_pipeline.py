"""`build_datasets` on a real local Ray: Parquet cache, reuse, disjoint test sets, text streams,
compact storage, batches of one length from Train-style shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data import DataError
from pipelines.data.batches import batches_per_epoch, shard_batches
from pipelines.data.build import MANIFEST, build_datasets
from pipelines.data.config import CopyTask, DataConfig, MQARTask, RecallPart, TextTask
from pipelines.data.layout import part_runs

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _runs(dataset) -> list[dict[str, np.ndarray]]:
    """Every run of rows of one part, decoded from the stored blocks."""
    blocks = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    return [rows for block in blocks for _, rows in part_runs(block)]


def _rows(dataset) -> set[tuple[bytes, bytes]]:
    return {
        (i.astype(np.int64).tobytes(), t.astype(np.int64).tobytes())
        for rows in _runs(dataset)
        for i, t in zip(rows["inputs"], rows["labels"], strict=True)
    }


def _columns(dataset) -> dict[str, np.ndarray]:
    """A one-part split's columns, rows in stream order (text)."""
    runs = _runs(dataset)
    columns = {name: np.concatenate([rows[name] for rows in runs]) for name in runs[0]}
    order = np.argsort(columns["position"])
    return {name: column[order] for name, column in columns.items()}


def _parquet_mtimes(path: Path) -> dict[Path, int]:
    return {file: file.stat().st_mtime_ns for file in path.rglob("*.parquet")}


def test_synthetic_data_is_written_once_and_reused(ray_local, tmp_path):
    task = MQARTask(
        vocab_size=64,
        parts=(RecallPart(seq_len=16, num_kv_pairs=2), RecallPart(seq_len=32, num_kv_pairs=4)),
        test_parts=(RecallPart(seq_len=48, num_kv_pairs=4),),
    )
    config = DataConfig(
        task=task, cache_dir=tmp_path, num_train_examples=90, num_test_examples=20, blocks=3
    )
    messages: list[str] = []
    first = build_datasets(config, progress=messages.append)
    assert not first.cached and first.path.parent == tmp_path
    assert (first.path / MANIFEST).is_file() and not list(tmp_path.glob(".tmp-*"))
    assert first.metadata.train_rows == first.train.count() == 90
    assert first.metadata.test_rows == first.test.count() == 20
    assert (first.metadata.train_seq_len, first.metadata.test_seq_len) == (32, 48)
    assert first.vocab_size == 64 and first.metadata.token_dtype == "int8"
    assert any("train 90/90, test 20/20" in m and "examples/s" in m for m in messages), messages
    batches = list(shard_batches(first.train.iterator(), 8, seed=0, drop_last=True))
    assert {tuple(b["inputs"].shape) for b in batches} == {(8, 16), (8, 32)}
    assert all(b["inputs"].dtype == b["labels"].dtype == torch.int8 for b in batches)

    before = _parquet_mtimes(first.path)
    again = build_datasets(config)
    assert again.cached and again.path == first.path
    assert _parquet_mtimes(again.path) == before, "the second call generated nothing"
    assert _rows(again.train) == _rows(first.train)


def test_the_data_does_not_depend_on_how_many_tasks_make_it(ray_local, tmp_path):
    task = MQARTask(vocab_size=64, parts=(RecallPart(seq_len=16, num_kv_pairs=2),))
    made = [
        build_datasets(
            DataConfig(
                task=task,
                cache_dir=tmp_path / str(blocks),
                blocks=blocks,
                num_train_examples=300,
                num_test_examples=40,
            )
        )
        for blocks in (1, 3)
    ]
    assert made[0].path.name == made[1].path.name, "blocks is not part of the cache key"
    assert _rows(made[0].train) == _rows(made[1].train)
    assert _rows(made[0].test) == _rows(made[1].test)


def test_every_rank_reads_the_split_in_one_order_and_keeps_its_slice(ray_local, tmp_path):
    """As Train workers read the unsplit train set: two readers of the same Dataset see the
    same blocks in the same order, so rank 0 and rank 1 agree on every step's part, hold
    disjoint rows, and both take `batches_per_epoch` steps."""
    task = MQARTask(
        vocab_size=128,
        parts=(
            RecallPart(seq_len=16, num_kv_pairs=2, weight=3),
            RecallPart(seq_len=24, num_kv_pairs=3),
            RecallPart(seq_len=24, num_kv_pairs=4),
        ),
    )
    config = DataConfig(task=task, cache_dir=tmp_path, num_train_examples=1001, blocks=2)
    prepared = build_datasets(config)
    ranks = [
        list(
            shard_batches(prepared.train.iterator(), 16, seed=0, drop_last=True, world=2, rank=rank)
        )
        for rank in (0, 1)
    ]
    steps = batches_per_epoch(task, 1001, 16, 2)
    assert [len(batches) for batches in ranks] == [steps, steps] and steps > 0
    for first, second in zip(*ranks, strict=True):
        assert torch.equal(first["num_kv_pairs"], second["num_kv_pairs"])
        assert len(set(first["num_kv_pairs"].tolist())) == 1, "one part per batch"
        assert first["inputs"].shape == (16, int(first["seq_len"][0]))
    rows = [{row.numpy().tobytes() for b in batches for row in b["inputs"]} for batches in ranks]
    assert not rows[0] & rows[1]


def test_test_rows_never_repeat_training_rows(ray_local, tmp_path):
    # 4 keys x 5 values, one query slot: 20 possible rows, so duplicates are certain.
    task = MQARTask(
        vocab_size=10, random_non_queries=False, parts=(RecallPart(seq_len=4, num_kv_pairs=1),)
    )
    config = DataConfig(
        task=task, cache_dir=tmp_path, num_train_examples=12, num_test_examples=30, blocks=2
    )
    prepared = build_datasets(config)
    assert prepared.metadata.dropped_test_rows > 0
    assert prepared.metadata.test_rows == 30 - prepared.metadata.dropped_test_rows
    assert not _rows(prepared.train) & _rows(prepared.test)


def test_a_failed_build_leaves_no_cache_behind(ray_local, tmp_path):
    # 2 keys x 3 values: every test row also occurs among 60 training rows.
    task = MQARTask(
        vocab_size=6, random_non_queries=False, parts=(RecallPart(seq_len=4, num_kv_pairs=1),)
    )
    config = DataConfig(
        task=task, cache_dir=tmp_path, num_train_examples=60, num_test_examples=5, blocks=1
    )
    with pytest.raises(DataError, match="every test row"):
        build_datasets(config)
    assert list(tmp_path.iterdir()) == []


def test_copy_task_trains_short_and_tests_long(ray_local, tmp_path):
    config = DataConfig(
        task=CopyTask(width=4, lengths=(1, 2, 3), test_lengths=(6,)),
        cache_dir=tmp_path,
        num_train_examples=30,
        num_test_examples=6,
        blocks=2,
    )
    prepared = build_datasets(config)
    assert prepared.test.take(1)[0]["length"] == 6
    assert (prepared.metadata.train_seq_len, prepared.metadata.test_seq_len) == (6, 12)


def test_text_streams_from_local_files(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"{index}.txt").write_bytes(bytes([65 + index]) * 200)
    task = TextTask(files=str(corpus / "*.txt"), stream_len=16, validation_fraction=0.2)
    config = DataConfig(task=task, cache_dir=tmp_path / "cache", blocks=3)
    prepared = build_datasets(config)
    assert prepared.vocab_size == 256
    train = _columns(prepared.train)
    inputs, labels = train["inputs"], train["labels"]
    assert inputs.shape == ((5 * 200 - 1) // 16, 16) and inputs.dtype == np.int16
    assert np.array_equal(labels[:-1, -1], inputs[1:, 0]), "rows continue one stream"
    train_letters = set(np.unique(inputs).tolist())
    test_letters = set(np.unique(_columns(prepared.test)["inputs"]).tolist())
    assert len(test_letters) == 1 and not train_letters & test_letters, "split by document"


def test_prep_command_reports_where_the_data_went(ray_local, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["prep", "--task", "copy", "--cache-dir", str(tmp_path)]
    args += ["-o", "task.lengths=[1,2]", "-o", "task.test_lengths=[4]", "-o", "blocks=1"]
    args += ["-o", "num_train_examples=20", "-o", "num_test_examples=4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "written at" in first.output and str(tmp_path) in first.output
    assert "examples/s" in first.output
    second = CliRunner().invoke(app, args)
    assert "reused from cache" in second.output and "train 20 rows" in second.output
