"""Invariants of the pure data generators, the stored layout and batching, the text layout and
the settings checks (no Ray)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data import DataError, parse_data_config, presets, segments
from pipelines.data.batches import batches_per_epoch, part_batches, task_batches
from pipelines.data.config import (
    ZOOLOGY_MQAR_TRAIN,
    CopyTask,
    DataConfig,
    ForgettingMQARTask,
    MQARTask,
    RecallPart,
    SelectiveCopyTask,
    SelectivePart,
    TextTask,
    config_from_overrides,
)
from pipelines.data.layout import part_runs, to_table, token_dtype
from pipelines.data.tasks import GENERATORS, copy, generate, generate_part, selective_copy
from pipelines.data.tasks.common import (
    IGNORE,
    apportion,
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


def _sequential_law(space: int, k: int, power_a: float) -> np.ndarray:
    """Exact `P(draw j = i)` `[k, space]` of sequential sampling without replacement with
    weights (i + 1) ** (power_a - 1), as Zoology's `np.random.choice(..., replace=False, p=p)`
    draws its gaps: every ordered k-tuple weighted by prod p(i_j) / (1 - p(i_1) - ... ))."""
    weights = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p = weights / weights.sum()
    law = np.zeros((k, space))
    for draws in itertools.permutations(range(space), k):
        probability, left = 1.0, 1.0
        for index in draws:
            probability *= p[index] / left
            left -= p[index]
        law[np.arange(k), draws] += probability
    return law


def _check_gaps_follow_the_law(gaps: np.ndarray, law: np.ndarray) -> None:
    """Mean gap and gap frequencies per key index within 5 standard errors of the exact law."""
    n, space = len(gaps), law.shape[1]
    values = np.arange(space)
    for index, column in enumerate(gaps.T):
        mean = law[index] @ values
        spread = np.sqrt((law[index] @ values**2 - mean**2) / n)
        assert abs(column.mean() - mean) < 5 * spread, f"mean gap of key {index}"
        share = np.bincount(column, minlength=space) / n
        error = np.sqrt(law[index] * (1 - law[index]) / n)
        assert np.all(np.abs(share - law[index]) < 5 * error + 1e-9), f"gaps of key {index}"


def test_power_law_columns_are_sequential_draws_without_replacement():
    """Column j is the j-th sequential draw (Zoology's law), not a random member of the set."""
    space, k, power_a, n = 10, 4, 0.01, 200_000
    law = _sequential_law(space, k, power_a)
    means = law @ np.arange(space)
    assert np.all(np.diff(means) > 0.2), "the law itself gives later draws farther gaps"
    gaps = power_law_choice(np.random.default_rng(0), space, n, k, power_a)
    assert all(len(set(row)) == k for row in gaps[:1000].tolist())
    _check_gaps_follow_the_law(gaps, law)


class _TiedExponentials:
    """A Generator stand-in whose 'exponentials' take 3 values: ties everywhere."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def standard_exponential(self, shape: tuple[int, int]) -> np.ndarray:
        return self.rng.integers(1, 4, size=shape).astype(np.float64)


def _reference_choice(rng, space: int, n: int, k: int, power_a: float) -> np.ndarray:
    """The definition, slowly: rank every key by (key, position) with a full stable sort."""
    inverse = np.array([(i + 1) ** (1 - power_a) for i in range(space)])
    keys = rng.standard_exponential((n, space)) * inverse
    return np.argsort(keys, axis=1, stable=True)[:, :k]


@pytest.mark.parametrize(("space", "k"), [(1, 1), (7, 7), (40, 3), (112, 16), (496, 256)])
@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_power_law_fast_path_equals_the_full_sort(space: int, k: int, tied: bool):
    """argpartition + stable sorts + the tie fallback give exactly the full stable sort's
    first k columns, with and without tied keys (power_a=1: equal weights, so equal keys)."""
    make, power_a = (_TiedExponentials, 1.0) if tied else (np.random.default_rng, 0.01)
    fast = power_law_choice(make(3), space, 300, k, power_a)
    assert np.array_equal(fast, _reference_choice(make(3), space, 300, k, power_a))


@pytest.mark.parametrize("kind", ["mqar", "forgetting_mqar"])
def test_the_jth_key_is_queried_at_the_jth_sequential_gap(kind: str):
    """In generated rows: key j of the context is queried at gap j of the sequential law."""
    part = RecallPart(seq_len=24, num_kv_pairs=3)
    task = ForgettingMQARTask(vocab_size=64, num_updates=1, parts=(part,), random_non_queries=False)
    if kind == "mqar":
        task = MQARTask(vocab_size=64, parts=(part,), random_non_queries=False)
    context = 2 * task.context_pairs(part)
    rows = generate_part(task, part, 100_000, np.random.default_rng(1))
    inputs = rows["inputs"]
    keys = inputs[:, 0 : 2 * part.num_kv_pairs : 2]  # [n, k], in context order
    queried = inputs[:, context:]  # query region; zeros elsewhere
    gaps = np.stack([np.argmax(queried == keys[:, [j]], axis=1) // 2 for j in range(3)], 1)
    assert np.all(queried[np.arange(len(gaps))[:, None], 2 * gaps] == keys)
    _check_gaps_follow_the_law(gaps, _sequential_law((part.seq_len - context) // 2, 3, 0.01))


_SIMD_SCRIPT = """
import hashlib, sys
import numpy as np
from pipelines.data.config import CopyTask, ForgettingMQARTask, MQARTask, SelectiveCopyTask
from pipelines.data.tasks import generate
digest = hashlib.sha256()
for task in (MQARTask(), ForgettingMQARTask(), CopyTask(), SelectiveCopyTask()):
    for name, column in sorted(generate(task, 3000, 7).items()):
        digest.update(name.encode() + np.ascontiguousarray(column).tobytes())
print(digest.hexdigest())
"""


def test_one_seed_gives_the_same_bytes_whatever_numpys_simd_path():
    """The same rows with numpy's SIMD dispatch on and off (`NPY_DISABLE_CPU_FEATURES`): the
    data must not depend on the CPU (argpartition's order did: it differs between SIMD paths)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    active = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    if not active:
        pytest.skip("this CPU runs numpy's baseline code only: there is no other path to compare")
    root = Path(__file__).resolve().parents[1]
    runs = []
    for disabled in ("", " ".join(active)):
        env = os.environ | {"PYTHONPATH": str(root), "NPY_DISABLE_CPU_FEATURES": disabled}
        done = subprocess.run(
            [sys.executable, "-c", _SIMD_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(done.stdout.strip())
    assert runs[0] == runs[1] and len(runs[0]) == 64


def test_apportion_follows_the_weights_and_sums_exactly():
    assert apportion(180_000, [100_000, 20_000, 20_000, 20_000, 20_000]) == [
        100_000,
        20_000,
        20_000,
        20_000,
        20_000,
    ]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [5, 1, 1]) == [5, 1, 1]
    assert sum(apportion(999, [3, 7, 11])) == 999


def test_zoology_mqar_preset_is_zoologys_config():
    """Numbers as read from Zoology's
    zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py (train_configs,
    test_configs: MQARConfig(vocab_size=8192, input_seq_len, num_examples, num_kv_pairs))."""
    config = presets.zoology_mqar()
    task = config.task
    assert isinstance(task, MQARTask) and task.vocab_size == 8192
    assert (task.power_a, task.random_non_queries) == (0.01, True)  # MQARConfig's defaults
    train = [(p.seq_len, p.num_kv_pairs, p.weight) for p in task.parts]
    assert train == [
        (64, 4, 100_000),
        (128, 8, 20_000),
        (256, 16, 20_000),
        (256, 32, 20_000),
        (256, 64, 20_000),
    ]
    test = [(p.seq_len, p.num_kv_pairs, p.weight) for p in task.test_parts or ()]
    assert test == [
        (64, 4, 1000),
        (64, 8, 1000),
        (64, 16, 1000),
        (128, 32, 1000),
        (256, 64, 1000),
        (512, 128, 1000),
        (1024, 256, 1000),
    ]
    assert (config.num_train_examples, config.num_test_examples) == (180_000, 7_000)
    assert apportion(config.num_train_examples, task.part_weights()) == [w for *_, w in train]
    config.check()
    training = presets.ZOOLOGY_MQAR_TRAINING
    assert (training.batch_size, training.eval_batch_size, training.epochs) == (256, 32, 32)
    assert training.learning_rates == pytest.approx(np.logspace(-3, -1.5, 4).tolist())


def test_zoology_iclr24_presets_train_and_test_one_setting():
    """zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py: one model per
    (seq_len, num_kv_pairs), 100,000 train and 3,000 test rows, random_non_queries=False."""
    settings = {(64, 4), (128, 8), (256, 16)}
    seen = set()
    for name in ("zoology-iclr24-64", "zoology-iclr24-128", "zoology-iclr24-256"):
        config = presets.PRESETS[name]()
        (part,) = config.task.parts
        seen.add((part.seq_len, part.num_kv_pairs))
        assert config.task.test_parts is None and not config.task.random_non_queries
        assert (config.num_train_examples, config.num_test_examples) == (100_000, 3_000)
    assert seen == settings
    assert presets.ZOOLOGY_ICLR24_TRAINING.learning_rates == pytest.approx(
        np.logspace(-4, -2, 4).tolist()
    )


def test_a_preset_is_a_starting_point_for_overrides():
    config = config_from_overrides("zoology-mqar", ["num_train_examples=1800", "seed=3"])
    assert config.task.parts == ZOOLOGY_MQAR_TRAIN and config.seed == 3
    assert apportion(1800, config.task.part_weights()) == [1000, 200, 200, 200, 200]
    with pytest.raises(DataError, match="weight=0"):
        MQARTask(parts=(RecallPart(seq_len=64, num_kv_pairs=4, weight=0),)).check()


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


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(64, np.int8), (128, np.int8), (256, np.int16), (8192, np.int16)]
)
def test_tokens_are_stored_in_the_smallest_type_holding_the_vocabulary_and_ignore(vocab, dtype):
    assert token_dtype(vocab) == dtype
    assert token_dtype(40_000) == np.int32
    with pytest.raises(DataError, match="vocab_size"):
        token_dtype(2**40)


def _stored_block(task, counts: list[int], seed: int = 0) -> tuple[pa.Table, list[dict]]:
    """A block as the cache stores it (through Parquet), and the rows that went in."""
    rng = np.random.default_rng(seed)
    parts = task.part_list()
    pieces = [generate_part(task, part, n, rng) for part, n in zip(parts, counts, strict=True)]
    table = to_table(pieces, list(range(len(pieces))), token_dtype(task.vocab_size))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return pq.read_table(pa.BufferReader(sink.getvalue())), pieces


def test_stored_rows_round_trip_exactly_at_their_own_length_in_compact_tokens():
    block, pieces = _stored_block(SMALL_MQAR, [30, 20])
    # Cut inside a part, as Ray's splitting of blocks between workers may.
    runs = [run for piece in (block.slice(0, 15), block.slice(15)) for run in part_runs(piece)]
    assert [(part, len(rows["inputs"])) for part, rows in runs] == [(0, 15), (0, 15), (1, 20)]
    for part, piece in enumerate(pieces):
        got = [rows for index, rows in runs if index == part]
        for name in ("inputs", "labels", "num_kv_pairs", "seq_len"):
            column = np.concatenate([rows[name] for rows in got])
            assert np.array_equal(column, piece[name]), name
        assert got[0]["inputs"].dtype == np.int8
        assert got[0]["inputs"].shape[1] == piece["inputs"].shape[1]
    assert not runs[0][1]["inputs"].flags.owndata, "token rows are views of the Arrow buffer"


def test_batches_hold_one_part_each_and_cover_every_row_once():
    chunks = [_stored_block(SMALL_MQAR, [150, 100], seed) for seed in (0, 1)]
    blocks = [block for block, _ in chunks]
    batches = list(part_batches(blocks, 16, seed=0, drop_last=False))
    widths = [batch["inputs"].shape[1] for batch in batches]
    assert all(len(set(batch["seq_len"].tolist())) == 1 for batch in batches)
    assert [b["seq_len"][0] for b in batches] == widths, "each batch at its own part's length"
    assert len(set(widths[:8])) == 2, "parts interleave instead of coming one after another"
    seen = sorted(row.tobytes() for batch in batches for row in batch["inputs"])
    made = [row for _, pieces in chunks for piece in pieces for row in piece["inputs"]]
    assert seen == sorted(row.astype(np.int8).tobytes() for row in made)
    assert [len(b["inputs"]) for b in batches].count(16) == 300 // 16 + 200 // 16
    again = list(part_batches(blocks, 16, seed=0, drop_last=False))
    assert all(
        np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again, strict=True)
    )


def _key(row: np.ndarray) -> bytes:
    return row.tobytes()


def test_ranks_train_on_the_same_part_at_every_step_with_disjoint_rows():
    """DDP: every rank reads all blocks and keeps its slice of each global batch, so the ranks
    agree on each step's part (its length decides the step's all-reduces) and never share rows;
    each takes exactly `batches_per_epoch` steps."""
    task = MQARTask(
        vocab_size=64,
        parts=(
            RecallPart(seq_len=16, num_kv_pairs=2, weight=3),
            RecallPart(seq_len=34, num_kv_pairs=5),
        ),
    )
    counts = apportion(500, task.part_weights())
    chunks = [_stored_block(task, [counts[0] // 2, counts[1] // 2], seed) for seed in (0, 1)]
    blocks = [block for block, _ in chunks]
    ranks = [
        list(part_batches(blocks, 8, seed=3, drop_last=True, world=3, rank=rank))
        for rank in range(3)
    ]
    steps = batches_per_epoch(task, 500, 8, 3)
    assert steps == 375 // 24 + 125 // 24
    assert [len(batches) for batches in ranks] == [steps] * 3
    for step in zip(*ranks, strict=True):
        assert len({batch["inputs"].shape for batch in step}) == 1, "one part per step"
        assert all(len(batch["inputs"]) == 8 for batch in step)
    rows = [{_key(row) for batch in batches for row in batch["inputs"]} for batches in ranks]
    assert sum(len(r) for r in rows) == len(set().union(*rows)) == steps * 24, "disjoint"


def test_task_batches_draw_one_part_per_step_by_weight():
    task = MQARTask(
        vocab_size=64,
        parts=(
            RecallPart(seq_len=16, num_kv_pairs=2, weight=3),
            RecallPart(seq_len=34, num_kv_pairs=5, weight=1),
        ),
    )
    batches = list(task_batches(task, batch_size=4, steps=400, seed=0))
    widths = [batch["inputs"].shape[1] for batch in batches]
    assert set(widths) == {16, 34} and 0.65 < widths.count(16) / 400 < 0.85
    assert all(batch["inputs"].dtype == torch.int64 for batch in batches)
    first = next(task_batches(task, batch_size=4, steps=1, seed=0))
    assert torch.equal(first["inputs"], batches[0]["inputs"])
