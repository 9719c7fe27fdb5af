"""`memlab report`: its numbers on hand-made tables, its pictures, its plans, and the whole command
on real Ray and MLflow at the tiny scale."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from memory_models.registry import REGISTRY, memory_config
from pipelines.cli import app
from pipelines.report import figures
from pipelines.report.analysis import asha_compute, by_configuration, pareto_front, threshold_effect
from pipelines.report.markdown import table
from pipelines.report.plan import ScaleDoesNotFit, check_fits, plan
from pipelines.report.scales import CONV_OPTION_KINDS, SCALES, MechanismGrid, scale

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T4, T8 = "val_accuracy_seq_len_32_num_kv_pairs_4", "val_accuracy_seq_len_64_num_kv_pairs_8"


def _trials() -> pd.DataFrame:
    rows = [
        # mechanism, memory_size, d_model, state bytes, accuracy, epochs run
        ("attention", None, 64, 1000, 0.99, 4),
        ("attention", 16, 64, 4000, 0.98, 1),  # more state, less recall: dominated
        ("gru", 64, 64, 100, 0.30, 2),
        ("gla", 8, 64, 500, 0.70, 4),
        ("gla", 32, 64, 600, 0.70, 1),  # as good as the smaller gla, with more state
        ("mamba", 8, 64, 50, float("nan"), 0),  # failed: no accuracy
    ]
    columns = ["mechanism", "memory_size", "d_model", "state_bytes", "val_accuracy", "epochs"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(
        max_epochs=4,
        early_stopped=[False, True, True, False, True, False],
        forget_threshold=0.0,
        **{T4: frame["val_accuracy"], T8: frame["val_accuracy"] / 2},
    )


def test_the_pareto_front_keeps_the_trials_nothing_beats():
    trials = _trials()
    front = trials[pareto_front(trials)]
    assert list(front["state_bytes"].sort_values()) == [100, 500, 1000]


def test_per_configuration_table_has_a_column_per_test_configuration():
    trials = _trials().assign(lr=1e-3)
    slower = trials[trials["mechanism"] == "gru"].assign(lr=3e-3, val_accuracy=0.2, **{T8: 0.1})
    shown = by_configuration(pd.concat([slower, trials]))
    assert [c for c in shown.columns if c.startswith("T=")] == ["T=32 k=4", "T=64 k=8"]
    assert "full" in set(shown["memory_size"])  # attention's memory_size None: the whole context
    gru = shown[shown["mechanism"] == "gru"]
    assert len(gru) == 1  # one row per point: its best learning rate
    assert (gru["T=64 k=8"].item(), gru["lr"].item()) == (pytest.approx(0.15), 1e-3)


def test_threshold_effect_is_best_minus_zero_and_zero_for_kinds_that_do_not_forget():
    trials = pd.DataFrame(
        [
            ("gla", 0.0, 0.5),
            ("gla", 0.1, 0.7),
            ("attention", 0.0, 0.9),
            ("attention", 0.1, 0.8),
            ("linear_attention", 0.0, 0.4),  # nothing to forget: threshold 0 only
        ],
        columns=["mechanism", "forget_threshold", "val_accuracy"],
    )
    effect = threshold_effect(trials).set_index("mechanism")
    assert effect.loc["gla", "effect"] == pytest.approx(0.2)
    assert effect.loc["gla", "best_threshold"] == "0.1"
    assert effect.loc["attention", "effect"] == pytest.approx(0.0)
    assert effect.loc["linear_attention", "effect"] == pytest.approx(0.0)
    assert math.isnan(effect.loc["linear_attention", "threshold 0.1"])


def test_asha_compute_counts_trial_epochs_against_the_full_grid():
    trials = _trials().iloc[:4]  # 4 trials of 4 epochs: 16 trial-epochs in full
    epochs = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "a", "c", "d", "a", "d", "a", "d"],
            "epoch": [1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4],
            "val_accuracy": [0.1, 0.2, 0.1, 0.3, 0.5, 0.3, 0.6, 0.99, 0.7, 0.97, 0.7],
        }
    )
    compute = asha_compute(trials, epochs)
    assert (compute.full_grid, compute.spent) == (16, 11)
    assert compute.to_best == 8  # 0.99 arrived as the 8th trial-epoch
    assert compute.best == pytest.approx(0.99)
    assert compute.early_stopped == 2
    assert compute.to_best_fraction == pytest.approx(0.5)


def test_the_figures_are_pngs(tmp_path):
    trials = _trials()
    forgetting = trials.assign(forget_threshold=[0.0, 0.1, 0.0, 0.0, 0.1, 0.0])
    paths = [
        figures.frontier(trials, tmp_path / "frontier.png", "test"),
        figures.configuration_heat_map(trials, tmp_path / "configs.png"),
        figures.forgetting_heat_map(forgetting, tmp_path / "forgetting.png"),
    ]
    # A sweep where nothing finished an epoch still gets its (empty) pictures.
    failed = trials.assign(val_accuracy=float("nan")).drop(columns=[T4, T8])
    paths += [
        figures.frontier(failed, tmp_path / "empty_frontier.png", "test"),
        figures.configuration_heat_map(failed, tmp_path / "empty_configs.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_markdown_table():
    frame = pd.DataFrame({"kind": ["gru"], "accuracy": [0.98765], "size": [None]})
    assert table(frame).splitlines() == [
        "| kind | accuracy | size |",
        "|---|---|---|",
        "| gru | 0.9877 |  |",
    ]


def test_every_scale_has_valid_data_and_the_cpu_grid_checks():
    for name in SCALES:
        chosen = scale(name)
        chosen.data.check()
        chosen.forgetting_data.check()
    cpu = plan(scale("cpu"), "report-cpu")
    assert [sweep.trials for sweep in cpu.sweeps] == [24, 11]
    assert 0.5 < cpu.wall_hours < 1.5  # "about an hour" on two cores, before ASHA's savings
    with pytest.raises(ValueError, match="unknown scale"):
        scale("laptop")


def test_forgetting_runs_each_kind_at_its_largest_memory_full_attention_above_all():
    attention = MechanismGrid(kind="attention", memory_sizes=(None, 16))
    gru = MechanismGrid(kind="gru", memory_sizes=(256, 64))
    assert [p["memory_size"] for p in attention.forgetting_points(1)] == [None, None]
    assert [p["memory_size"] for p in gru.forgetting_points(1)] == [256, 256]


def test_forgetting_thresholds_lie_where_each_kind_forgets():
    """A share kind and a decay kind act at different thresholds: each draws its own."""
    for kind in ("attention", "gla", "mamba", "linear_attention"):
        grid = MechanismGrid(kind=kind, memory_sizes=(16,))
        thresholds = [p["forget_threshold"] for p in grid.forgetting_points(2)]
        assert thresholds[0] == 0.0
        if REGISTRY[kind].forgets:
            low, high = REGISTRY[kind].threshold_range
            assert len(thresholds) == 3 and all(low < t < high for t in thresholds[1:])
        else:
            assert thresholds == [0.0]


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_kinds_with_the_convolution_option_run_with_it(name):
    """Without the short convolution the fixed-state kinds stay at MQAR's plateau (see
    `scales.SHORT_CONV`); a scale that left it off would measure the wrong model."""
    assert set(CONV_OPTION_KINDS) == {"linear_attention", "retnet", "gla", "deltanet"}
    points = scale(name).frontier_space()["model.memory"]["grid"]
    optional = [p for p in points if p["kind"] in CONV_OPTION_KINDS]
    assert optional and all(p["conv_size"] == 4 for p in optional)
    models = [memory_config(point).build(64) for point in points]
    assert all(model.short_conv.size == 4 for model in models if hasattr(model, "short_conv"))


def test_a_gpu_scale_on_a_cluster_without_gpus_is_refused_clearly():
    with pytest.raises(ScaleDoesNotFit, match=r"1 GPU\(s\).*has 0.*--scale cpu"):
        check_fits(scale("gpu"), {"CPU": 4.0})
    check_fits(scale("cpu"), {"CPU": 4.0})


@pytest.mark.timeout(180)
def test_gpu_dry_run_prints_the_full_zoology_plan_without_ray():
    import ray

    running = ray.is_initialized()
    result = CliRunner().invoke(app, ["report", "--scale", "gpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "768 trials x 32 epochs" in text
    assert "GPU hours" in text and "FLOP model" in text
    assert ray.is_initialized() == running


@pytest.mark.ray
@pytest.mark.timeout(480)  # about 90 s alone; 270 s seen on a 2-core machine under other load
def test_tiny_report_runs_end_to_end_and_logs_to_the_parent_run(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # memlab_runs/ (store, sweeps, data, report) under tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["report", "--scale", "tiny", "--name", "tiny", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    folder = tmp_path / "out"
    report = (folder / "report.md").read_text()
    assert "![frontier](frontier.png)" in report and "ASHA's compute" in report
    for name in ("frontier.png", "accuracy_by_configuration.png", "forgetting.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    trials = pd.read_csv(folder / "trials.csv")
    assert set(trials["mechanism"]) == {"attention", "linear_attention"}
    assert {
        "val_accuracy_seq_len_16_num_kv_pairs_2",
        "val_accuracy_seq_len_24_num_kv_pairs_4",
    } <= set(trials.columns)  # every test configuration evaluated
    assert trials["mlflow_run_id"].notna().all()
    # The eviction frontier: the full-attention trial's weights under every policy and budget.
    assert "## Eviction policies" in report and "![eviction](eviction.png)" in report
    assert (folder / "eviction.png").read_bytes()[:8] == PNG_MAGIC
    policies = pd.read_csv(folder / "eviction.csv")
    assert len(policies) == 1 + 5 * 3  # full, then 5 policies x 3 budgets
    assert set(policies["policy"]) == {"full", "window", "sinks", "threshold", "h2o", "tova"}
    assert policies["mlflow_run_id"].nunique() == 1
    bounded = policies[policies["policy"] != "full"]
    assert set(bounded["memory_size"]) == {2, 4, 8}  # 1/8, 1/4, 1/2 of the 16-token rows
    assert (bounded["state_bytes"] < policies["state_bytes"].max()).all()
    forgetting = pd.read_csv(folder / "forgetting_trials.csv")
    linear = forgetting[forgetting["mechanism"] == "linear_attention"]
    assert set(linear["forget_threshold"]) == {0.0}  # it has nothing to forget
    assert len(forgetting) == 3

    client = MlflowClient(f"sqlite:///{tmp_path / 'memlab_runs' / 'mlflow.db'}")
    parent = client.search_runs(
        [client.get_experiment_by_name("memlab").experiment_id],
        filter_string="tags.`memlab.sweep` = 'tiny'",
    )[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/frontier.png"} <= logged
    assert parent.info.run_id in report

    # Read again from the stored sweeps, running nothing.
    again = CliRunner().invoke(
        app, ["report", "--scale", "tiny", "--from-sweep", "tiny", "--out", str(tmp_path / "re")]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "re" / "report.md").exists()
