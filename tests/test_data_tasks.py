"""Invariants of the pure data generators, the text layout and the settings checks (no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipelines.data import DataError, parse_data_config, segments
from pipelines.data.config import (
    CopyTask,
    DataConfig,
    ForgettingMQARTask,
    MQARTask,
    RecallPart,
    SelectiveCopyTask,
    SelectivePart,
    TextTask,
)
from pipelines.data.tasks import GENERATORS, copy, generate, selective_copy
from pipelines.data.tasks.common import (
    IGNORE,
    distinct_choice,
    power_law_choice,
    row_hashes,
)
from pipelines.data.text import load_corpus, split_documents, stream_rows

SMALL_MQAR = MQARTask(
    vocab_size=64,
    parts=(RecallPart(seq_len=16, num_kv_pairs=2), RecallPart(seq_len=34, num_kv_pairs=5)),
)
TASKS = [
    SMALL_MQAR,
    ForgettingMQARTask(vocab_size=64, num_updates=2, parts=SMALL_MQAR.parts),
    CopyTask(width=3, lengths=(1, 4, 7)),
    SelectiveCopyTask(vocab_size=12, parts=(SelectivePart(seq_len=33, num_tokens=5),)),
]


def _context(row: np.ndarray, pairs: int) -> list[tuple[int, int]]:
    return [(int(row[2 * i]), int(row[2 * i + 1])) for i in range(pairs)]


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_labels_are_the_values_paired_with_the_queried_keys(random_non_queries: bool):
    task = SMALL_MQAR.model_copy(update={"random_non_queries": random_non_queries})
    batch = generate(task, 200, seed=1)
    vocab = task.vocab_size
    for row, target, k, length in zip(
        batch["inputs"], batch["labels"], batch["num_kv_pairs"], batch["seq_len"], strict=True
    ):
        pairs = dict(_context(row, k))
        assert len(pairs) == k, "keys are distinct"
        assert all(1 <= key < vocab // 2 <= value < vocab for key, value in pairs.items())
        scored = np.flatnonzero(target != IGNORE)
        assert len(scored) == k and scored.min() >= 2 * k
        assert np.all((scored - 2 * k) % 2 == 0), "queries sit at even offsets"
        assert sorted(row[scored].tolist()) == sorted(pairs), "every key is queried once"
        assert all(target[p] == pairs[row[p]] for p in scored)
        assert np.all(row[length:] == 0) and np.all(target[length:] == IGNORE), "padding"
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < vocab


def test_mqar_without_random_fill_leaves_non_queries_zero():
    task = SMALL_MQAR.model_copy(update={"random_non_queries": False})
    batch = generate(task, 50, seed=2)
    k = batch["num_kv_pairs"][:, None]
    position = np.arange(batch["inputs"].shape[1])[None, :]
    query_region = (position >= 2 * k) & (batch["labels"] == IGNORE)
    assert np.all(batch["inputs"][query_region] == 0)


def test_mixture_holds_every_part_and_pads_short_rows():
    batch = generate(SMALL_MQAR, 101, seed=3)
    assert batch["inputs"].shape == (101, 34) and batch["inputs"].dtype == np.int64
    lengths, counts = np.unique(batch["seq_len"], return_counts=True)
    assert lengths.tolist() == [16, 34] and counts.tolist() == [51, 50]
    assert not np.array_equal(batch["seq_len"][:51], np.full(51, 16)), "rows are shuffled"


def test_forgetting_mqar_answers_with_the_latest_value():
    task = TASKS[1]
    batch = generate(task, 200, seed=4)
    u = task.num_updates
    for row, target, k in zip(batch["inputs"], batch["labels"], batch["num_kv_pairs"], strict=True):
        original = dict(_context(row, k))
        updates = _context(row[2 * k :], u)
        assert len({key for key, _ in updates}) == u and all(key in original for key, _ in updates)
        assert all(original[key] != value for key, value in updates), "a new value each time"
        latest = original | dict(updates)
        scored = np.flatnonzero(target != IGNORE)
        assert all(target[p] == latest[row[p]] for p in scored)
        assert len(scored) == k


def test_copy_reproduces_the_vectors_after_the_delimiter():
    task = TASKS[2]
    batch = generate(task, 60, seed=5)
    for row, target, length in zip(batch["inputs"], batch["labels"], batch["length"], strict=True):
        symbols = row[:length]
        assert np.all((symbols >= copy.FIRST_SYMBOL) & (symbols < task.vocab_size))
        assert row[length] == copy.DELIMITER and np.all(row[length + 1 : 2 * length] == copy.BLANK)
        assert np.array_equal(target[length : 2 * length], symbols)
        assert np.all(target[:length] == IGNORE) and np.all(target[2 * length :] == IGNORE)


def test_selective_copy_reproduces_the_scattered_tokens_in_order():
    task = TASKS[3]
    batch = generate(task, 60, seed=6)
    m = 5
    context = 33 - m
    for row, target in zip(batch["inputs"], batch["labels"], strict=True):
        data = row[:context][row[:context] != selective_copy.NOISE]
        assert len(data) == m and np.all(data >= selective_copy.FIRST_DATA)
        assert row[context] == selective_copy.DELIMITER
        assert np.array_equal(target[context:], data) and np.all(target[:context] == IGNORE)


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.kind)
def test_generators_are_deterministic_per_seed(task):
    first, again, other = (generate(task, 40, seed) for seed in (7, 7, 8))
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["inputs"], other["inputs"])
    assert first["inputs"].dtype == first["labels"].dtype == np.int64


def test_every_kind_but_text_has_a_generator():
    assert set(GENERATORS) == {"mqar", "forgetting_mqar", "copy", "selective_copy"} | {
        "seq2seq_mqar",
        "seq2seq_copy",
        "seq2seq_reverse",
        "seq2seq_recall",
    }


@pytest.mark.parametrize(("low", "high", "k"), [(1, 4096, 16), (0, 6, 5), (3, 40, 8)])
def test_distinct_choice_rows_are_distinct_and_in_range(low: int, high: int, k: int):
    rows = distinct_choice(np.random.default_rng(0), low, high, 500, k)
    assert rows.min() >= low and rows.max() < high
    assert all(len(set(row)) == k for row in rows.tolist())


def test_power_law_gaps_match_sequential_weighted_sampling():
    """Fast path (Gumbel top-k) against the reference Zoology uses (`choice`, no replacement)."""
    space, k, power_a, n = 8, 3, 0.3, 20_000
    fast = power_law_choice(np.random.default_rng(0), space, n, k, power_a)
    weights = power_a * np.arange(1, space + 1) ** (power_a - 1)
    rng = np.random.default_rng(1)
    slow = np.stack(
        [rng.choice(space, k, replace=False, p=weights / weights.sum()) for _ in range(n)]
    )
    fast_share = np.bincount(fast.ravel(), minlength=space) / n
    slow_share = np.bincount(slow.ravel(), minlength=space) / n
    assert np.abs(fast_share - slow_share).max() < 0.03
    assert fast_share[0] > fast_share[-1], "near gaps are favoured"


def test_row_hash_ignores_padding_width_but_tells_rows_apart():
    batch = generate(SMALL_MQAR, 300, seed=9)
    hashes = row_hashes(batch)
    assert len(set(hashes.tolist())) == 300
    wider = {
        "inputs": np.pad(batch["inputs"], ((0, 0), (0, 10))),
        "labels": np.pad(batch["labels"], ((0, 0), (0, 10)), constant_values=IGNORE),
        "seq_len": batch["seq_len"],
    }
    assert np.array_equal(row_hashes(wider), hashes)


@pytest.mark.parametrize(
    ("task", "words"),
    [
        (MQARTask(parts=(RecallPart(seq_len=16, num_kv_pairs=8),)), "seq_len must be >= 32"),
        (MQARTask(vocab_size=32, parts=(RecallPart(seq_len=64, num_kv_pairs=4),)), "vocab_size"),
        (MQARTask(parts=(RecallPart(seq_len=64, num_kv_pairs=-1),)), "num_kv_pairs"),
        (MQARTask(parts=(RecallPart(seq_len=63, num_kv_pairs=4),)), "even"),
        (MQARTask(parts=()), "task.parts is empty"),
        (
            ForgettingMQARTask(num_updates=9, parts=(RecallPart(seq_len=64, num_kv_pairs=4),)),
            "num_updates",
        ),
        (CopyTask(lengths=(0, 3)), "task.lengths"),
        (CopyTask(width=40), "task.width"),
        (SelectiveCopyTask(vocab_size=4), "task.vocab_size"),
        (SelectiveCopyTask(parts=(SelectivePart(seq_len=10, num_tokens=6),)), "seq_len must be"),
    ],
)
def test_impossible_task_parameters_name_the_parameter(task, words: str):
    with pytest.raises(DataError, match=words):
        task.check()
    if task.kind != "text":
        with pytest.raises(DataError):
            generate(task, 4, seed=0)


def test_negative_counts_and_typos_are_data_errors():
    with pytest.raises(DataError, match="num_train_examples=-5"):
        DataConfig(num_train_examples=-5).check()
    with pytest.raises(DataError, match="num_examples=-1"):
        generate(SMALL_MQAR, -1, seed=0)
    with pytest.raises(DataError, match="vocab_sise"):
        parse_data_config({"task": {"kind": "mqar", "vocab_sise": 10}})
    with pytest.raises(DataError, match="task"):
        parse_data_config({"task": {"kind": "nope"}})


def test_build_rejects_bad_settings_before_touching_the_cache(tmp_path):
    from pipelines.data.build import build_datasets

    config = DataConfig(
        task=MQARTask(parts=(RecallPart(seq_len=8, num_kv_pairs=4),)), cache_dir=tmp_path / "c"
    )
    with pytest.raises(DataError, match="seq_len"):
        build_datasets(config)
    assert not (tmp_path / "c").exists()


def test_text_rows_are_consecutive_bytes_of_one_stream():
    stream = bytes(range(256)) * 3
    rows = stream_rows(stream, stream_len=10, first_row=4)
    flat = np.frombuffer(stream, dtype=np.uint8)
    assert rows["inputs"].shape == ((len(stream) - 1) // 10, 10)
    assert np.array_equal(rows["inputs"].ravel(), flat[: rows["inputs"].size])
    assert np.array_equal(rows["labels"][:, :-1], rows["inputs"][:, 1:])
    assert np.array_equal(rows["labels"][:-1, -1], rows["inputs"][1:, 0])
    assert rows["position"][0] == 40


def test_segments_continue_each_row_and_reset_only_first():
    rows = stream_rows(bytes(range(200)), stream_len=33)
    parts = list(segments(rows["inputs"], 10, rows["labels"]))
    assert [part.reset for part in parts] == [True, False, False, False]
    assert [part.inputs.shape[1] for part in parts] == [10, 10, 10, 3]
    assert np.array_equal(np.concatenate([p.inputs for p in parts], 1), rows["inputs"])
    for before, after in itertools.pairwise(parts):
        # Row i of segment k + 1 starts with the token row i of segment k was predicting.
        assert np.array_equal(after.inputs[:, 0], before.labels[:, -1])


def test_split_by_document_keeps_each_document_on_one_side():
    documents = [f"doc {index} ".encode() * 5 for index in range(40)]
    train, validation = split_documents(documents, 0.1, seed=0)
    assert len(validation) == 4 and len(train) == 36
    assert not set(train) & set(validation) and set(train) | set(validation) == set(documents)


def test_text_corpus_from_a_glob_and_the_stdlib(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.txt").write_text("memory " * 40)
    corpus = load_corpus(TextTask(files=str(tmp_path / "*.txt"), stream_len=16), seed=0)
    assert len(corpus.train) == 4 * 280 and len(corpus.validation) == 280
    stdlib = load_corpus(TextTask(max_bytes=50_000, stream_len=16), seed=0)
    assert len(stdlib.train) + len(stdlib.validation) == 50_000


def test_text_corpus_errors_name_the_file_or_setting(tmp_path):
    with pytest.raises(DataError, match="matched no files"):
        load_corpus(TextTask(files=str(tmp_path / "*.none")), seed=0)
    for index in range(3):
        (tmp_path / f"{index}.txt").write_text("")
    with pytest.raises(DataError, match="0 non-empty"):
        load_corpus(TextTask(files=str(tmp_path / "*.txt")), seed=0)
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(DataError, match=r"folder\.txt"):
        load_corpus(TextTask(files=str(tmp_path / "*.txt")), seed=0)
    with pytest.raises(DataError, match="hf_path"):
        load_corpus(TextTask(hf_path=tmp_path / "missing"), seed=0)


def test_text_corpus_from_a_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"line {index} of a saved data set\n" * 4 for index in range(10)]
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    task = TextTask(hf_path=tmp_path / "saved", text_column="body", stream_len=8)
    corpus = load_corpus(task, seed=0)
    assert len(corpus.train) + len(corpus.validation) == sum(len(text) for text in texts)
    with pytest.raises(DataError, match="text_column"):
        load_corpus(task.model_copy(update={"text_column": "text"}), seed=0)


def test_prep_command_rejects_impossible_settings_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["prep", "--cache-dir", str(tmp_path / "c"), "-o", "task.vocab_size=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "vocab_size" in result.output
    assert not (tmp_path / "c").exists()
