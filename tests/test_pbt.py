"""Settings that move during a run, on real Ray and a real MLflow store: the capacity controller
inside one training run, and population-based tuning across trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.checkpoint import read_config
from pipelines.experiment import apply_overrides, outputs_under
from pipelines.recipes import debug
from pipelines.train.driver import train
from pipelines.tune.pbt import PLOT_FILE
from pipelines.tune.settings import SweepSettings
from pipelines.tune.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _base(root: Path, **extra):
    return apply_overrides(
        debug("attention"),
        {
            **outputs_under(root),
            "data.num_train_examples": 128,
            "data.num_test_examples": 32,
            "train.epochs": 2,
            "train.max_eval_batches": 1,
        }
        | extra,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.ray
@pytest.mark.timeout(600)  # ~100 s on an idle 2-core machine; shared machines run slower
def test_the_loss_controller_moves_capacity_on_every_rank_and_keeps_it_across_a_crash(
    ray_local, tmp_path
):
    """Two workers (the decision is broadcast), evaluations every 2 steps, a tolerance so wide
    that no loss counts as an improvement, so the size doubles at every second evaluation; a
    crash at step 5 restores the size chosen at step 4."""
    config = _base(
        tmp_path,
        **{
            "train.max_steps_per_epoch": 4,
            "train.fail_once_at_step": 5,
            "train.capacity.policy": "loss",
            "train.capacity.eval_every_steps": 2,
            "train.capacity.patience": 1,
            "train.capacity.tolerance": 10.0,
            "scaling.num_workers": 2,
        },
    )
    outcome = train(config)

    client = MlflowClient(config.tracking.resolved_uri())
    assert _history(client, outcome.run_id, "capacity.memory_size") == [(4, 32.0), (8, 64.0)]
    schedule = _history(client, outcome.run_id, "schedule.memory_size")
    assert (0, 16.0) in schedule  # the start
    assert schedule.count((4, 32.0)) == 2  # the change, and the restore after the crash
    folder = client.download_artifacts(outcome.run_id, "capacity_events.json", str(tmp_path))
    events = json.loads(Path(folder).read_text())
    assert [(e["step"], e["old"], e["new"], e["reason"]) for e in events] == [
        (4, 16, 32, "grow"),
        (8, 32, 64, "grow"),
    ]
    # The logged model is the one trained at the final size.
    assert read_config(Path(outcome.checkpoint_path)).model.memory.memory_size == 64


@pytest.mark.ray
@pytest.mark.timeout(600)  # ~150 s on an idle 2-core machine: 4 Train runs, 2 trial restarts
def test_pbt_sweep_exploits_through_checkpoints_and_logs_every_schedule(ray_local, tmp_path):
    base = _base(tmp_path, **{"train.max_steps_per_epoch": 2, "scaling.num_workers": 1})
    space = {
        "model.memory.memory_size": {"grid": [8, 16]},
        "train.lr": {"loguniform": [1e-3, 1e-2]},
    }
    settings = SweepSettings(name="pbt", scheduler="pbt", storage_path=tmp_path / "tune")
    outcome = run_sweep(base, space, settings)

    table = outcome.table
    assert len(table) == 2 and (table["status"] == "ok").all()
    client = MlflowClient(base.tracking.resolved_uri())
    parent_artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert PLOT_FILE in parent_artifacts
    plot = tmp_path / "tune" / "pbt" / "report" / PLOT_FILE
    assert plot.read_bytes()[:8] == PNG_MAGIC

    moved = 0
    for row in table.itertuples():
        lrs = _history(client, row.mlflow_run_id, "schedule.lr")
        sizes = _history(client, row.mlflow_run_id, "schedule.memory_size")
        # Every trial started its second segment from a Tune checkpoint (step 2, not 0) ...
        assert [step for step, _ in lrs] == [0, 2] and [step for step, _ in sizes] == [0, 2]
        moved += lrs[0][1] != lrs[1][1]
        # ... and the table (which the champion comes from) holds the final settings.
        assert row.memory_size == sizes[-1][1]
    assert moved >= 1  # the lower trial exploited the upper one and explored a new lr
    champion = outcome.champion
    assert champion and champion["memory_size"] in (8, 16)
