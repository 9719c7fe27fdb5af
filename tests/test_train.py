"""Training: the plain loop without Ray, then real Ray Train runs tracked in a real MLflow store."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config
from pipelines.data import tasks
from pipelines.data.batches import shard_batches
from pipelines.experiment import OverrideError, apply_overrides, outputs_under
from pipelines.recipes import SMALL_RECALL, debug
from pipelines.train.loop import (
    StartedEarly,
    StepOptions,
    TrainingModule,
    evaluate,
    lr_schedule,
    to_device,
    train_batch,
    train_steps,
)
from pipelines.train.metrics import EvalAccumulator
from pipelines.train.tracking import RUN_NAME_TAG


def _recall_batches(rows: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    raw = tasks.generate(SMALL_RECALL, rows, seed)
    columns = {k: torch.as_tensor(v) for k, v in raw.items()}
    return [
        {k: v[i : i + batch_size] for k, v in columns.items()} for i in range(0, rows, batch_size)
    ]


def _model(kind: str = "gru"):
    config = SequenceModelConfig(
        vocab_size=SMALL_RECALL.vocab_size, d_model=32, memory=memory_config({"kind": kind})
    )
    return config.build()


def test_plain_loop_lowers_the_loss_without_ray():
    model = _model("gru")
    module = TrainingModule(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    scheduler = lr_schedule(optimizer, warmup_steps=2, total_steps=200, kind="cosine")
    batches = _recall_batches(256, 16)
    before = evaluate(model, batches[:4], segment_len=None, task_kind="mqar")["loss"]
    for _ in range(3):
        for batch in batches:
            result = train_batch(module, batch, optimizer, scheduler, segment_len=16, grad_clip=1.0)
            assert math.isfinite(result.loss)
    after = evaluate(model, batches[:4], segment_len=None, task_kind="mqar")["loss"]
    assert after < before - 0.5
    assert result.state_bytes_per_sequence == model.state_size_bytes(64)


def test_segmented_evaluation_carries_the_state():
    """Streaming a row in segments with the carried state gives the full pass's metrics."""
    model = _model("lstm")
    batches = _recall_batches(32, 16)
    whole = evaluate(model, batches, segment_len=None, task_kind="mqar")
    pieces = evaluate(model, batches, segment_len=7, task_kind="mqar")
    assert pieces["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert pieces["accuracy"] == whole["accuracy"]


def test_metrics_count_what_they_say():
    vocab = 8
    labels = torch.tensor([[-100, 3, -100, 4], [-100, 5, -100, 6]])
    logits = torch.full((2, 4, vocab), -10.0)
    for row, col, guess in [(0, 1, 3), (0, 3, 0), (1, 1, 5), (1, 3, 6)]:
        logits[row, col, guess] = 10.0
    accumulator = EvalAccumulator("mqar")
    groups = {"seq_len": torch.tensor([64, 64]), "num_kv_pairs": torch.tensor([4, 8])}
    accumulator.add(logits, {"labels": labels, **groups})
    result = accumulator.result()
    assert result["accuracy"] == 0.75
    assert result["accuracy_seq_len_64_num_kv_pairs_4"] == 0.5
    assert result["accuracy_seq_len_64_num_kv_pairs_8"] == 1.0

    copy = EvalAccumulator("copy", bit_width=3)
    # target vector 0b101 (token 3 + 5 = 8); guess 0b100 (token 7): one bit wrong
    copy_logits = torch.full((1, 1, 12), -10.0)
    copy_logits[0, 0, 7] = 10.0
    copy.add(copy_logits, {"labels": torch.tensor([[8]]), "length": torch.tensor([1])})
    assert copy.result()["bits_wrong_per_sequence"] == 1.0

    text = EvalAccumulator("text")
    text.add(torch.zeros(1, 2, 256), {"labels": torch.tensor([[1, 2]])})
    assert text.result()["bits_per_byte"] == pytest.approx(8.0)


def _logged_run(kind: str, batches, log_every: int, segment_len: int | None = 16):
    """`train_steps` from a fixed seed; returns [(step, metrics)] of every log."""
    torch.manual_seed(0)
    module = TrainingModule(_model(kind))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    scheduler = lr_schedule(optimizer, warmup_steps=2, total_steps=100)
    options = StepOptions(segment_len=segment_len, log_every=log_every)
    logged = []
    for _ in train_steps(
        module, batches, optimizer, scheduler, options, log=lambda s, m: logged.append((s, m))
    ):
        pass
    return logged


def test_logging_every_n_steps_logs_those_steps_with_the_window_means():
    batches = _recall_batches(112, 16)  # 7 steps
    every_third = _logged_run("gru", batches, log_every=3)
    assert [step for step, _ in every_third] == [3, 6]  # step 7 ends no window
    each = dict(_logged_run("gru", batches, log_every=1))  # the same training, read per step
    for step, metrics in every_third:
        window = [each[s]["train_loss"] for s in range(step - 2, step + 1)]
        assert metrics["train_loss"] == pytest.approx(sum(window) / 3, rel=1e-6)
        assert metrics["tokens_per_second"] > 0
        assert metrics["state_bytes_per_sequence"] == _model("gru").state_size_bytes(64)
        times = [metrics[f"time/{k}"] for k in ("step_ms", "data_wait_ms", "compute_ms")]
        assert all(t >= 0 for t in times) and metrics["time/step_ms"] >= times[2]


@pytest.mark.parametrize("kind", ["gru", "linear_attention"])
def test_steps_wait_for_the_device_only_when_they_log(monkeypatch, kind):
    """Counts every host read of a tensor value: none on steps that do not log.

    Mechanisms whose forward itself reads nothing back; those that compact a cache to a
    data-dependent size (attention's eviction, for one) read per segment on their own. SGD, since
    AdamW reads its step counter, a host tensor even when the model is on a GPU.
    """
    torch.manual_seed(0)
    module = TrainingModule(_model(kind))
    memory_metrics = len(module.model.init_state(1).metrics())
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    batches = _recall_batches(96, 16)  # 6 steps, 4 segments each
    optimizer = torch.optim.SGD(module.parameters(), lr=3e-3)
    options = StepOptions(segment_len=16, log_every=3)
    logs = []
    reads_per_step = []
    steps = train_steps(module, batches, optimizer, None, options, log=lambda s, m: logs.append(s))
    for _ in steps:
        reads_per_step.append(len(reads))
        reads.clear()
    assert logs == [3, 6]
    assert [n > 0 for n in reads_per_step] == [False, False, True, False, False, True]
    assert reads_per_step[2] == 1 + memory_metrics  # the losses' one sync, then the memory
    for _ in train_steps(module, batches, optimizer, None, options):
        pass
    assert reads == []  # without a log nothing is read back at all


def test_compact_token_columns_widen_on_the_device():
    batch = {"inputs": torch.arange(6, dtype=torch.int16).view(2, 3), "labels": [[-100, 1, 2]]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["inputs"].dtype == torch.long and moved["labels"].dtype == torch.long
    assert moved["inputs"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert moved["labels"].tolist() == [[-100, 1, 2]]


def test_a_stream_started_early_yields_everything_in_order_and_raises_its_errors():
    import threading

    started = threading.Event()

    def stream():
        started.set()  # runs before anyone iterates
        yield from range(5)

    early = StartedEarly(stream())
    assert started.wait(timeout=10)
    assert list(early) == [0, 1, 2, 3, 4]
    assert list(StartedEarly(iter([]))) == []

    def broken():
        raise OSError("block lost")
        yield

    with pytest.raises(OSError, match="block lost"):
        list(StartedEarly(broken()))


def test_overrides_apply_and_fail_with_the_key_named():
    config = apply_overrides(debug("gru"), ["model.memory.memory_size=24", "train.lr=0.001"])
    assert config.model.memory.memory_size == 24 and config.train.lr == 0.001
    switched = apply_overrides(config, ["model.memory.kind=attention"])
    assert switched.model.memory.kind == "attention"
    with pytest.raises(OverrideError, match=r"model\.memory\.memroy_size"):
        apply_overrides(config, ["model.memory.memroy_size=3"])
    with pytest.raises(OverrideError, match="unknown config path 'trian'"):
        apply_overrides(config, ["trian.lr=1"])
    with pytest.raises(OverrideError, match="forget_threshold"):
        apply_overrides(config, ["model.memory.forget_threshold=1.5"])
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        apply_overrides(config, ["model.vocab_size=8"])


def _tiny(kind: str, root: Path, **overrides):
    values = {
        **outputs_under(root),
        "train.max_steps_per_epoch": 2,
        "train.log_every_steps": 1,
        "data.num_train_examples": 128,
        "data.num_test_examples": 32,
        "train.max_eval_batches": 1,
    } | overrides
    return apply_overrides(debug(kind), values)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(REGISTRY))
def test_every_mechanism_has_a_pulse_on_two_workers(ray_local, tmp_path, kind):
    from pipelines.train.driver import train

    config = _tiny(kind, tmp_path)
    outcome = train(config)
    assert outcome.metrics["step"] == 2
    assert 0.0 <= outcome.metrics["val_accuracy"] <= 1.0
    run = MlflowClient(config.tracking.resolved_uri()).get_run(outcome.run_id)
    assert run.data.params["model.memory.kind"] == f'"{kind}"'
    assert run.data.tags["mechanism"] == kind
    assert {"train_loss", "val_loss", "val_accuracy", "state_bytes_per_sequence"} <= set(
        run.data.metrics
    )
    assert run.info.status == "FINISHED"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_logged_model_loads_in_a_fresh_process(ray_local, tmp_path):
    from pipelines.train.driver import train

    config = _tiny("gru", tmp_path)
    outcome = train(config)
    code = (
        "import mlflow, torch, sys; mlflow.set_tracking_uri(sys.argv[1]); "
        "m = mlflow.pytorch.load_model(sys.argv[2]); "
        "print(tuple(m(torch.zeros(2, 5, dtype=torch.long)).shape))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, config.tracking.resolved_uri(), outcome.model_uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"(2, 5, {SMALL_RECALL.vocab_size})")
    artifacts = {
        a.path for a in MlflowClient(config.tracking.resolved_uri()).list_artifacts(outcome.run_id)
    }
    assert {"experiment.json", "curves.png", "checkpoint"} <= artifacts


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_same_name_resumes_the_run_and_its_mlflow_run(ray_local, tmp_path):
    from pipelines.train.driver import train

    first = train(_tiny("lstm", tmp_path, **{"run.name": "resume-me"}))
    second = train(_tiny("lstm", tmp_path, **{"run.name": "resume-me", "train.epochs": 2}))
    assert second.resumed and second.run_id == first.run_id
    assert second.metrics["epoch"] == 2 and second.metrics["step"] == 4  # 2 new steps, not 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("memlab").experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = 'resume-me'",
    )
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(first.run_id, "val_accuracy")]
    assert steps == [2, 4]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_crash_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    from pipelines.train.driver import train

    config = _tiny(
        "gru",
        tmp_path,
        **{
            "train.max_steps_per_epoch": 4,
            "train.checkpoint_every_steps": 2,
            "train.fail_once_at_step": 3,
            "run.max_failures": 1,
        },
    )
    outcome = train(config)
    assert (tmp_path / "ray" / config.run_name / "fault_injected").exists()
    assert outcome.metrics["step"] == 4
    client = MlflowClient(config.tracking.resolved_uri())
    logged_steps = [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")]
    assert logged_steps.count(3) == 2  # step 3 ran before the crash and again after the restore
    assert logged_steps.count(2) == 1  # step 2 was in the checkpoint: not repeated


@pytest.mark.ray
@pytest.mark.timeout(400)  # two fits, like the other resume tests
def test_too_many_failures_end_with_a_clear_error_and_the_run_marked_failed(ray_local, tmp_path):
    from pipelines.train.driver import TrainingError, train

    overrides = {
        "run.name": "gives-up",
        "run.max_failures": 0,
        "scaling.num_workers": 1,  # one worker is enough to fail, and starts faster
        "train.max_steps_per_epoch": 3,
        "train.checkpoint_every_steps": 1,
        "train.fail_once_at_step": 2,  # after step 1's checkpoint
    }
    config = _tiny("gru", tmp_path, **overrides)
    with pytest.raises(TrainingError, match="'gives-up' failed") as raised:
        train(config)
    client = MlflowClient(config.tracking.resolved_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("memlab").experiment_id])
    assert run.info.status == "FAILED"
    assert run.info.run_id in str(raised.value)
    assert "resume" in str(raised.value)
    assert list((tmp_path / "ray" / "gives-up").glob("checkpoint_*")), "checkpoint not kept"

    # What the message promises: the same command resumes the same run from step 1's checkpoint.
    outcome = train(config)
    assert outcome.resumed and outcome.run_id == run.info.run_id
    assert outcome.metrics["step"] == 3
    assert outcome.metrics["train_seconds"] > 0  # in-loop time, read by benchmarks/bench_train.py
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 2, 3]  # step 2 before and after the crash


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_worker_logs_the_losses_the_plain_loop_computes(ray_local, tmp_path):
    """Same seed, rows, order and accumulation: rank 0 of a 1-worker run logs to MLflow exactly
    the window losses that `train_steps` in this process gives."""
    from pipelines.data.build import build_datasets
    from pipelines.train.driver import train

    overrides = {"scaling.num_workers": 1, "train.log_every_steps": 2, "train.epochs": 1}
    config = _tiny("gru", tmp_path, **overrides, **{"train.max_steps_per_epoch": 4})
    outcome = train(config)
    client = MlflowClient(config.tracking.resolved_uri())
    logged = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "train_loss")}
    assert sorted(logged) == [2, 4]
    assert set(client.get_run(outcome.run_id).data.metrics) >= {"time.step_ms", "time.log_ms"}

    train_config = config.train
    rows = shard_batches(  # what rank 0 of one worker reads in epoch 0
        build_datasets(config.data).train,
        train_config.batch_size,
        seed=train_config.seed,
        drop_last=True,
    )
    batches = [to_device(batch, torch.device("cpu")) for batch in itertools.islice(rows, 4)]
    torch.manual_seed(train_config.seed)  # rank 0's seed
    module = TrainingModule(config.model.build(), train_config.aux_loss_weight)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    total = 4 * 2  # steps x segments (rows of 64 tokens in segments of 32), one epoch
    scheduler = lr_schedule(optimizer, train_config.warmup_steps, total, train_config.schedule)
    options = StepOptions(segment_len=train_config.segment_len, log_every=2)
    plain = {}
    steps = train_steps(module, batches, optimizer, scheduler, options, log=plain.__setitem__)
    assert list(steps) == [1, 2, 3, 4]
    assert {step: m["train_loss"] for step, m in plain.items()} == pytest.approx(logged, rel=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_every_rank_reads_the_whole_train_set_in_the_same_block_order(ray_local):
    import ray.data

    from pipelines.train.driver import ingest_config

    train = ray.data.from_items([{"row": i} for i in range(40)], override_num_blocks=8)
    test = ray.data.from_items([{"row": i} for i in range(4)])
    shards = ingest_config().configure({"train": train.materialize(), "test": test}, 2, None, None)
    for epoch in range(2):
        seen = [[row["row"] for row in shard["train"].iter_rows()] for shard in shards]
        assert seen[0] == seen[1] == list(range(40)), epoch
