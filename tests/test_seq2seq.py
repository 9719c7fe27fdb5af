"""Sequence-to-sequence tasks and the encoder-decoder in the pipeline: generators, settings checks,
metrics, the plain loop with a context column, configs, the Parquet cache and Ray Train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data import DataError, parse_data_config
from pipelines.data.config import (
    DataConfig,
    LongRecallPart,
    Seq2SeqCopyTask,
    Seq2SeqMQARTask,
    Seq2SeqRecallTask,
    Seq2SeqReverseTask,
)
from pipelines.data.tasks import generate, seq2seq_copy, seq2seq_recall
from pipelines.data.tasks.common import IGNORE, row_hashes
from pipelines.data.tasks.seq2seq import as_decoder_only
from pipelines.experiment import ExperimentConfig, OverrideError, apply_overrides, outputs_under
from pipelines.recipes import debug_encdec, encoder_decoder, recipe
from pipelines.train.loop import TrainingModule, evaluate, lr_schedule, train_batch
from pipelines.train.metrics import EvalAccumulator

MQAR = Seq2SeqMQARTask(vocab_size=40, num_kv_pairs=(2, 5))
COPY = Seq2SeqCopyTask(vocab_size=12, lengths=(1, 4, 6))
REVERSE = Seq2SeqReverseTask(vocab_size=12, lengths=(3, 5))
RECALL = Seq2SeqRecallTask(
    vocab_size=40,
    parts=(
        LongRecallPart(context_len=20, num_kv_pairs=4, num_queries=2),
        LongRecallPart(context_len=30, num_kv_pairs=6, num_queries=6),
    ),
)
TASKS = [MQAR, COPY, REVERSE, RECALL]


def test_seq2seq_mqar_asks_every_key_of_the_context_once():
    batch = generate(MQAR, 300, seed=3)
    assert batch["context"].shape == batch["inputs"].shape == (300, 10)
    for context, inputs, labels, k in zip(
        batch["context"], batch["inputs"], batch["labels"], batch["num_kv_pairs"], strict=True
    ):
        pairs = dict(
            zip(context[0 : 2 * k : 2].tolist(), context[1 : 2 * k : 2].tolist(), strict=True)
        )
        assert len(pairs) == k and not context[2 * k :].any(), "distinct keys, then padding"
        assert all(1 <= key < 20 <= value < 40 for key, value in pairs.items())
        asked, answers = inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2]
        assert sorted(asked.tolist()) == sorted(pairs)
        assert [pairs[key] for key in asked.tolist()] == answers.tolist(), "answers fed back"
        assert labels[0 : 2 * k : 2].tolist() == answers.tolist()
        assert (labels[1::2] == IGNORE).all() and (labels[2 * k :] == IGNORE).all()


@pytest.mark.parametrize("task", [COPY, REVERSE], ids=lambda task: task.kind)
def test_copy_and_reverse_write_the_context_back_then_end(task):
    batch = generate(task, 200, seed=4)
    for context, inputs, labels, length in zip(
        batch["context"], batch["inputs"], batch["labels"], batch["length"], strict=True
    ):
        symbols = context[:length]
        assert (symbols >= seq2seq_copy.FIRST_SYMBOL).all() and not context[length:].any()
        target = symbols[::-1] if task.kind == "seq2seq_reverse" else symbols
        assert labels[: length + 1].tolist() == [*target.tolist(), seq2seq_copy.END]
        assert inputs[: length + 1].tolist() == [seq2seq_copy.GO, *target.tolist()]
        assert (labels[length + 1 :] == IGNORE).all()
    assert set(batch["length"].tolist()) == set(task.lengths)


def test_copy_tests_at_twice_the_training_length_by_default():
    assert COPY.test_task().lengths == (12,)
    assert COPY.model_copy(update={"test_lengths": (7, 9)}).test_task().lengths == (7, 9)
    test_rows = generate(COPY.test_task(), 5, seed=0)
    assert test_rows["context"].shape == (5, 12) and test_rows["inputs"].shape == (5, 13)


def test_long_recall_hides_the_pairs_in_noise_and_asks_some_of_them():
    batch = generate(RECALL, 200, seed=5)
    assert batch["context"].shape == (200, 30) and batch["inputs"].shape == (200, 12)
    for context, inputs, labels, n, k, q in zip(
        batch["context"],
        batch["inputs"],
        batch["labels"],
        batch["context_len"],
        batch["num_kv_pairs"],
        batch["num_queries"],
        strict=True,
    ):
        keys = np.flatnonzero((context >= seq2seq_recall.FIRST_KEY) & (context < 20))
        assert len(keys) == k and (keys % 2 == 0).all(), "k keys at even offsets"
        assert ((context[keys + 1] >= 20) & (context[keys + 1] < 40)).all(), "each before its value"
        noise = np.setdiff1d(np.arange(n), np.concatenate([keys, keys + 1]))
        assert (context[noise] == seq2seq_recall.NOISE).all() and not context[n:].any()
        pairs = dict(zip(context[keys].tolist(), context[keys + 1].tolist(), strict=True))
        asked = inputs[0 : 2 * q : 2].tolist()
        assert len(set(asked)) == q and set(asked) <= set(pairs)
        assert labels[0 : 2 * q : 2].tolist() == [pairs[key] for key in asked]
        assert (labels[2 * q :] == IGNORE).all()


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.kind)
def test_generators_are_deterministic_and_hash_the_context(task):
    first, again, other = (generate(task, 50, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["context"], other["context"])
    assert {c.dtype for c in first.values()} == {np.dtype(np.int64)}
    hashes = row_hashes(first)
    changed = dict(first, context=first["context"].copy())
    changed["context"][:, 0] += 1
    assert not np.array_equal(row_hashes(changed), hashes), "the context is part of a row"
    wider = dict(first, context=np.pad(first["context"], ((0, 0), (0, 4))))
    assert np.array_equal(row_hashes(wider), hashes), "context padding does not count"


def test_decoder_only_rows_are_context_then_questions():
    one_length = Seq2SeqMQARTask(vocab_size=40, num_kv_pairs=(3,))
    batch = generate(one_length, 8, seed=1)
    flat = as_decoder_only(batch)
    assert "context" not in flat and flat["inputs"].shape == flat["labels"].shape == (8, 12)
    assert np.array_equal(flat["inputs"][:, :6], batch["context"])
    assert (flat["labels"][:, :6] == IGNORE).all()
    assert np.array_equal(flat["labels"][:, 6:], batch["labels"])
    assert (flat["seq_len"] == 12).all()


@pytest.mark.parametrize(
    ("task", "words"),
    [
        (Seq2SeqMQARTask(vocab_size=8, num_kv_pairs=(4,)), "raise vocab_size to at least 10"),
        (Seq2SeqMQARTask(num_kv_pairs=()), "task.num_kv_pairs is empty"),
        (Seq2SeqMQARTask(num_kv_pairs=(0, 2)), "every count must be >= 1"),
        (
            Seq2SeqMQARTask(vocab_size=20, num_kv_pairs=(3,), test_num_kv_pairs=(30,)),
            "task.test_num_kv_pairs",
        ),
        (Seq2SeqCopyTask(vocab_size=3), "task.vocab_size=3"),
        (Seq2SeqReverseTask(lengths=(0,)), "task.lengths has lengths"),
        (Seq2SeqCopyTask(test_lengths=()), "task.test_lengths is empty"),
        (
            Seq2SeqRecallTask(
                parts=(LongRecallPart(context_len=9, num_kv_pairs=2, num_queries=1),)
            ),
            "context_len must be even",
        ),
        (
            Seq2SeqRecallTask(
                parts=(LongRecallPart(context_len=8, num_kv_pairs=5, num_queries=1),)
            ),
            "context_len must be >= 10",
        ),
        (
            Seq2SeqRecallTask(
                parts=(LongRecallPart(context_len=8, num_kv_pairs=2, num_queries=3),)
            ),
            "num_queries must be in",
        ),
        (Seq2SeqRecallTask(vocab_size=10), "raise vocab_size"),
    ],
)
def test_impossible_settings_name_the_setting(task, words):
    with pytest.raises(DataError, match=words):
        task.check()
    with pytest.raises(DataError):
        generate(task, 4, seed=0)


def test_seq2seq_kinds_parse_from_plain_dicts():
    config = parse_data_config({"task": {"kind": "seq2seq_reverse", "lengths": [2, 3]}})
    assert isinstance(config.task, Seq2SeqReverseTask)
    with pytest.raises(DataError, match="lenghts"):
        parse_data_config({"task": {"kind": "seq2seq_copy", "lenghts": [2]}})


def test_metrics_group_seq2seq_tasks_and_count_whole_sequences():
    labels = torch.tensor([[3, 4, 2], [5, 6, 2]])
    logits = torch.full((2, 3, 8), -10.0)
    for row, col, guess in [(0, 0, 3), (0, 1, 4), (0, 2, 2), (1, 0, 5), (1, 1, 7), (1, 2, 2)]:
        logits[row, col, guess] = 10.0
    copy = EvalAccumulator("seq2seq_copy")
    copy.add(logits, {"labels": labels, "length": torch.tensor([2, 3])})
    result = copy.result()
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["sequence_accuracy"] == 0.5
    assert result["accuracy_length_2"] == 1.0 and result["accuracy_length_3"] == pytest.approx(
        2 / 3
    )
    recall = EvalAccumulator("seq2seq_recall")
    recall.add(logits, {"labels": labels, "context_len": torch.tensor([64, 64])})
    assert "accuracy_context_len_64" in recall.result()


def _batches(task, rows: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    columns = {k: torch.as_tensor(v) for k, v in generate(task, rows, seed).items()}
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, rows, size)]


def test_the_plain_loop_trains_an_encoder_decoder_from_the_context_column():
    model = encoder_decoder("attention", MQAR.vocab_size, d_model=32, memory_size=4).build()
    module = TrainingModule(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    scheduler = lr_schedule(optimizer, warmup_steps=2, total_steps=40)
    batches = _batches(MQAR, 128, 16)
    before = evaluate(model, batches[:2], task_kind="seq2seq_mqar")
    for batch in batches * 2:
        result = train_batch(module, batch, optimizer, scheduler, grad_clip=1.0)
    after = evaluate(model, batches[:2], task_kind="seq2seq_mqar")
    assert after["loss"] < before["loss"] - 0.5
    assert {"accuracy_num_kv_pairs_2", "accuracy_num_kv_pairs_5"} <= set(after)
    assert result.state_bytes_per_sequence == model.state_size_bytes(10, context_len=10)
    assert "cross/live_entries" in result.memory


def test_segments_read_the_memory_encoded_on_the_first():
    """The context is encoded once, on a row's first segment; later segments read the carried
    memory, so segmented evaluation equals the whole pass (chunk-invariant decoder memory)."""
    model = encoder_decoder("gru", COPY.vocab_size, d_model=32).build()
    batches = _batches(COPY, 32, 16)
    whole = evaluate(model, batches, segment_len=None, task_kind="seq2seq_copy")
    pieces = evaluate(model, batches, segment_len=2, task_kind="seq2seq_copy")
    assert pieces["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert pieces["accuracy"] == whole["accuracy"]


def test_experiment_configs_pick_the_architecture_and_round_trip():
    config = recipe("seq2seq-mqar-small")
    assert config.model.architecture == "encoder_decoder"
    again = ExperimentConfig.model_validate_json(config.model_dump_json())
    assert again == config and type(again.model.build()).__name__ == "EncoderDecoderModel"
    assert config.flat()["model.architecture"] == '"encoder_decoder"'
    assert recipe("mqar-small").model.architecture == "decoder_only"
    switched = apply_overrides(
        recipe("debug-gru"),
        [
            "model.architecture=encoder_decoder",
            "model.cross_memory.memory_size=4",
            'data.task={"kind": "seq2seq_copy", "lengths": [2, 5]}',
        ],
    )
    assert switched.model.cross_memory.memory_size == 4 and switched.model.memory.kind == "gru"
    with pytest.raises(OverrideError, match=r"set model\.architecture=encoder_decoder"):
        apply_overrides(debug_encdec(), ["model.architecture=decoder_only"])
    with pytest.raises(OverrideError, match="needs a task with a context"):
        apply_overrides(recipe("debug-gru"), ["model.architecture=encoder_decoder"])


@pytest.mark.slow
def test_encoder_decoder_attention_learns_seq2seq_recall():
    """The learning floor in miniature: 4 pairs over 64 symbols, recall >= 95 % within a few hundred
    steps (about 10 CPU seconds; benchmarks/bench_encdec_learning.py runs the full comparison)."""
    torch.manual_seed(0)
    task = Seq2SeqMQARTask(vocab_size=64, num_kv_pairs=(4,))
    model = encoder_decoder("attention", 64, d_model=64).build()
    module = TrainingModule(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = lr_schedule(optimizer, warmup_steps=50, total_steps=400)
    held_out = _batches(task, 256, 256, seed=0)
    accuracy = 0.0
    for step in range(1, 401):
        train_batch(module, _batches(task, 64, 64, seed=step)[0], optimizer, scheduler)
        if step % 50 == 0:
            accuracy = evaluate(model, held_out, task_kind="seq2seq_mqar")["accuracy"]
            if accuracy >= 0.95:
                break
    assert accuracy >= 0.95


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_parquet_cache_carries_the_context(ray_local, tmp_path):
    from pipelines.data.batches import shard_batches
    from pipelines.data.build import build_datasets
    from pipelines.train.loop import to_device

    config = DataConfig(
        task=REVERSE, cache_dir=tmp_path, num_train_examples=60, num_test_examples=20, blocks=2
    )
    data = build_datasets(config)
    stored = next(shard_batches(data.test, 4, seed=0, drop_last=False))
    batch = to_device(stored, torch.device("cpu"))
    assert batch["context"].shape == (4, 10) and batch["inputs"].shape == (4, 11)
    assert batch["context"].dtype == torch.int64 and stored["context"].dtype == torch.int8
    expected = seq2seq_copy.generate_part(REVERSE.test_task(), 10, 1, np.random.default_rng(0))
    assert set(expected) | {"row_hash"} == set(stored)
    assert build_datasets(config).cached


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_debug_encdec_has_a_pulse_on_two_workers(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.train.driver import train

    config = apply_overrides(
        debug_encdec(),
        {
            **outputs_under(tmp_path),
            "train.max_steps_per_epoch": 2,
            "train.log_every_steps": 1,
            "train.max_eval_batches": 1,
        },
    )
    outcome = train(config)
    assert outcome.metrics["step"] == 2
    assert 0.0 <= outcome.metrics["val_accuracy"] <= 1.0
    run = MlflowClient(config.tracking.resolved_uri()).get_run(outcome.run_id)
    assert run.data.params["model.architecture"] == '"encoder_decoder"'
    assert {"val_accuracy", "memory.cross.live_entries"} <= set(run.data.metrics)
