"""`report.md`: every figure with the exact configuration, seeds, steps, wall time and MLflow run
ids, so anyone can rerun it; and the tables it shows, as Markdown."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipelines.report.analysis import (
    CONFIG_METRIC,
    METRIC,
    AshaCompute,
    by_configuration,
    threshold_effect,
)
from pipelines.report.collect import SweepTables
from pipelines.report.scales import ReportScale

TRIAL_COLUMNS = (
    "trial_id",
    "mechanism",
    "memory_size",
    "forget_threshold",
    "d_model",
    "lr",
    "state_bytes",
    METRIC,
    "best_epoch",
    "epochs",
    "early_stopped",
    "status",
    "mlflow_run_id",
)


@dataclass(frozen=True)
class ReportContext:
    """What the text needs besides the tables: how it was run and where it went."""

    scale: ReportScale
    name: str
    command: str
    git_commit: str
    tracking_uri: str
    plan: list[str]
    grace_period: int


def table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (floats to 4 places, NaN as blank)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:g}"
    return str(value)


def report_markdown(
    context: ReportContext,
    frontier: SweepTables,
    forgetting: SweepTables,
    front: pd.DataFrame,
    asha: AshaCompute,
    eviction: pd.DataFrame,
) -> str:
    sections = [
        _title(context),
        _setup(context, frontier, forgetting),
        _frontier(frontier, front),
        _configurations(frontier),
        _eviction(eviction),
        _forgetting(forgetting),
        _asha(asha, context.scale),
        _trials("Every trial: MQAR", frontier),
        _trials("Every trial: forgetting-MQAR", forgetting),
        "## The plan\n\n```\n" + "\n".join(context.plan) + "\n```\n",
    ]
    return "\n".join(sections)


def _title(context: ReportContext) -> str:
    return (
        f"# Recall against state size: memlab report `{context.name}` (scale "
        f"`{context.scale.name}`)\n\n"
        "Multi-query associative recall (MQAR) as Zoology measures it (Arora et al. 2023, "
        '"Zoology: Measuring and Improving Recall in Efficient Language Models", figure 2): '
        "every mechanism at several memory sizes and widths, accuracy against the bytes of "
        "state a sequence holds.\n\n"
        f"Reproduce: `{context.command}` at git commit `{context.git_commit}`.\n"
    )


def _setup(context: ReportContext, frontier: SweepTables, forgetting: SweepTables) -> str:
    scale = context.scale
    train = scale.train
    lines = [
        "## Setup\n",
        f"- Scale `{scale.name}`: {scale.why}.",
        f"- MQAR data: `{_json(scale.data.model_dump(mode='json', exclude={'cache_dir'}))}`.",
        "- Forgetting-MQAR data: "
        f"`{_json(scale.forgetting_data.model_dump(mode='json', exclude={'cache_dir'}))}`.",
        f"- Model: {scale.n_layers} layers, d_model {list(scale.d_models)} (forgetting sweep "
        f"{list(scale.forgetting_d_models)}), vocabulary {scale.data.task.vocab_size}.",
        "- Mechanisms and memory sizes: "
        + "; ".join(f"{g.kind} {list(g.memory_sizes)}" for g in scale.mechanisms)
        + f"; forget thresholds 0 and {scale.acting_thresholds} inside each kind's "
        "`threshold_range` (each kind's largest memory).",
        f"- Training: `{_json(train.model_dump(mode='json', exclude={'lr'}))}`, learning rates "
        f"{list(scale.learning_rates)} (forgetting sweep {list(scale.rates(forgetting=True))}); "
        f"seeds: data {scale.data.seed}, training {train.seed}.",
        f"- ASHA: by epoch, grace period {context.grace_period}, reduction factor 2, last rung "
        f"before epoch {train.epochs}; a stopped trial keeps its best epoch so far.",
        f"- Ray: {scale.scaling.num_workers} worker(s) per trial, "
        f"{scale.scaling.cpus_per_worker:g} CPU each, GPU {scale.scaling.use_gpu}.",
        f"- MLflow ({context.tracking_uri}): sweep `{frontier.name}` parent run "
        f"`{frontier.parent_run_id}`, sweep `{forgetting.name}` parent run "
        f"`{forgetting.parent_run_id}`; every trial's run id is in the trial tables below.",
        f"- Wall time: {_hours(frontier.wall_seconds)} for `{frontier.name}` "
        f"({len(frontier.trials)} trials), {_hours(forgetting.wall_seconds)} for "
        f"`{forgetting.name}` ({len(forgetting.trials)} trials).",
    ]
    return "\n".join(lines) + "\n"


def _frontier(frontier: SweepTables, front: pd.DataFrame) -> str:
    shown = front[["mechanism", "memory_size", "d_model", "state_bytes", METRIC, "mlflow_run_id"]]
    return (
        "## Accuracy against state size\n\n![frontier](frontier.png)\n\n"
        "One curve per mechanism through its best trial at each state size, every trial a "
        "point, hollow where ASHA stopped it early; the dashed line is the Pareto front: the "
        "trials no other trial beats with as little state. On the front:\n\n" + table(shown) + "\n"
    )


def _configurations(frontier: SweepTables) -> str:
    return (
        "## Accuracy per test configuration\n\n"
        "![accuracy by configuration](accuracy_by_configuration.png)\n\n"
        "Each trial's best epoch; T is the sequence length, k the key-value pairs "
        "(`accuracy_by_configuration.csv`).\n\n" + table(by_configuration(frontier.trials)) + "\n"
    )


def _eviction(policies: pd.DataFrame) -> str:
    title = "## Eviction policies: what a bounded cache keeps\n\n"
    if policies.empty:
        return title + "No finished full-attention trial with a logged model to evict from.\n"
    columns = ["policy", "memory_size", "state_bytes", METRIC]
    columns += [c for c in policies.columns if CONFIG_METRIC.match(c)]
    return (
        title + "![eviction](eviction.png)\n\n"
        "The best full-attention trial's weights (MLflow run "
        f"`{policies['mlflow_run_id'].iloc[0]}`) scored with every eviction policy at caches "
        "of a fraction of the longest training row, on fresh rows of the test configurations "
        "(`eviction.csv`). Scores are whole rows; every memory is chunk invariant, so a served "
        "session gets the same. The model never trained with a bounded cache: the sweep's own "
        "bounded trials show what training with one gives.\n\n" + table(policies[columns]) + "\n"
    )


def _forgetting(forgetting: SweepTables) -> str:
    if forgetting.trials.empty:
        return "## Forgetting-MQAR\n\nNo forgetting trial finished.\n"
    return (
        "## Forgetting-MQAR: the forget threshold's effect\n\n![forgetting](forgetting.png)\n\n"
        "Keys are re-assigned during the context and the latest value is the answer. Best "
        "accuracy per mechanism and forget threshold; `effect` is the best over thresholds "
        "minus the accuracy at threshold 0. Kinds with nothing to forget ran at 0 only "
        "(`forgetting.csv`).\n\n" + table(threshold_effect(forgetting.trials)) + "\n"
    )


def _asha(asha: AshaCompute, scale: ReportScale) -> str:
    return (
        "## ASHA's compute\n\n"
        f"The MQAR grid has {asha.trials} trials of {asha.max_epochs} epochs: "
        f"{asha.full_grid} trial-epochs to run in full. ASHA stopped {asha.early_stopped} "
        f"trials early and ran {asha.spent} trial-epochs ({asha.spent_fraction:.0%} of the full "
        f"grid); the grid's best accuracy, {asha.best:.4f}, was first reached after "
        f"{asha.to_best} trial-epochs ({asha.to_best_fraction:.0%} of the full grid), counting "
        "every trial's epochs in the order Tune received them. Target: at most a third.\n"
    )


def _trials(title: str, sweep: SweepTables) -> str:
    if sweep.trials.empty:
        return f"## {title}\n\nNo trials.\n"
    columns = [c for c in TRIAL_COLUMNS if c in sweep.trials.columns]
    ordered = sweep.trials.sort_values(["mechanism", "state_bytes"])[columns]
    return f"## {title}\n\n" + table(ordered) + "\n"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"
