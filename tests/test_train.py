"""Training: the plain loop without Ray, then real Ray Train runs tracked in a real MLflow store."""

from __future__ import annotations

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
from pipelines.experiment import OverrideError, apply_overrides
from pipelines.recipes import SMALL_RECALL, debug
from pipelines.train.loop import TrainingModule, evaluate, lr_schedule, train_batch
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
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "run.storage_path": str(root / "ray"),
        "data.cache_dir": str(root / "data"),
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
