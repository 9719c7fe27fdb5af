"""Ray Tune sweeps on real Ray with a real MLflow store and registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from memory_models.registry import REGISTRY
from pipelines.experiment import apply_overrides, outputs_under
from pipelines.recipes import debug
from pipelines.tune.settings import SweepSettings
from pipelines.tune.space import (
    SpaceError,
    acting_threshold_space,
    parse_space,
    planned_trials,
)
from pipelines.tune.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _base(root: Path):
    return apply_overrides(
        debug("gru"),
        {
            **outputs_under(root),
            "data.num_train_examples": 128,
            "data.num_test_examples": 32,
            "train.epochs": 2,
            "train.max_steps_per_epoch": 2,
            "train.max_eval_batches": 1,
            "scaling.num_workers": 1,
        },
    )


SPACE = {
    "model.memory.kind": {"grid": ["gru", "attention"]},
    "model.memory.memory_size": {"grid": [8, 16]},
    "model.memory.forget_threshold": {"grid": [0.0, 0.2]},
}


def test_a_bad_search_key_fails_before_any_trial(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(SpaceError, match=r"model\.memory\.memroy_size"):
        parse_space({"model.memory.memroy_size": {"grid": [8]}}, base)
    with pytest.raises(SpaceError, match="forget_threshold"):
        parse_space({"model.memory.forget_threshold": {"uniform": [0.0, 1.5]}}, base)
    with pytest.raises(SpaceError, match="exactly one"):
        parse_space({"train.lr": {"grid": [0.1], "uniform": [0.1, 0.2]}}, base)
    with pytest.raises(SpaceError, match=r"train\.lr"):
        run_sweep(base, {"train.lr": {"loguniform": [-1.0, 1.0]}}, SweepSettings())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_registers_a_loadable_champion_and_resumes(ray_local, tmp_path):
    base = _base(tmp_path)
    settings = SweepSettings(name="small", storage_path=tmp_path / "tune")
    outcome = run_sweep(base, SPACE, settings)

    table = outcome.table
    assert len(table) == 8
    assert set(table["mechanism"]) == {"gru", "attention"}
    assert table["state_bytes"].gt(0).all()
    assert outcome.table_path.exists()
    for path in outcome.plot_paths:
        assert path.read_bytes()[:8] == PNG_MAGIC

    client = MlflowClient(base.tracking.resolved_uri())
    children = client.search_runs(
        [client.get_experiment_by_name("memlab").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    assert len(children) == 8
    parent_artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {
        "results.csv",
        "accuracy_vs_state_bytes.png",
        "accuracy_heatmaps.png",
    } <= parent_artifacts

    version = client.get_model_version_by_alias(settings.registered_model, "champion")
    assert version.tags["mechanism"] in {'"gru"', '"attention"'}
    assert client.get_model_version_by_alias(settings.registered_model, "best_gru")
    mlflow.set_tracking_uri(base.tracking.resolved_uri())
    champion = mlflow.pytorch.load_model(f"models:/{settings.registered_model}@champion")
    assert champion(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, base.model.vocab_size)

    # A second run of the same sweep with --resume re-runs no finished trial.
    again = run_sweep(base, SPACE, settings, resume=True)
    assert len(again.table) == 8
    children_after = client.search_runs(
        [client.get_experiment_by_name("memlab").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    assert len(children_after) == 8


def test_acting_thresholds_give_each_kind_its_own_grid():
    """`memlab tune --acting-thresholds N`: a share kind and a decay kind each get thresholds
    where theirs act; a kind with nothing to forget gets 0 only; the base's other fields stay."""
    base = apply_overrides(debug("attention"), {"model.memory.n_heads": 2})
    space = acting_threshold_space(base, ["attention", "gla", "linear_attention"], [8], 2)
    points = space["model.memory"]["grid"]
    by_kind: dict[str, list[float]] = {}
    for point in points:
        by_kind.setdefault(point["kind"], []).append(point["forget_threshold"])
        assert point["memory_size"] == 8
    assert by_kind["linear_attention"] == [0.0]
    for kind in ("attention", "gla"):
        low, high = REGISTRY[kind].threshold_range
        assert by_kind[kind][0] == 0.0 and all(low < t < high for t in by_kind[kind][1:])
        assert len(by_kind[kind]) == 3
    assert next(p for p in points if p["kind"] == "attention")["n_heads"] == 2
    assert planned_trials(space) == 7
