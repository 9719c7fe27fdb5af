"""`memlab report`: two Tune sweeps at a scale (MQAR: mechanism x memory_size x d_model;
forgetting-MQAR: the same with forget_threshold as a third axis), or two that already ran, turned
into a folder of figures, tables and `report.md`, logged to the MQAR sweep's MLflow parent run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from pipelines.experiment import RUNS_DIR, ExperimentConfig, Strict, apply_overrides
from pipelines.report import figures
from pipelines.report.analysis import (
    AshaCompute,
    asha_compute,
    by_configuration,
    pareto_front,
    threshold_effect,
)
from pipelines.report.collect import SweepTables, read_sweep
from pipelines.report.eviction import eviction_frontier
from pipelines.report.markdown import ReportContext, report_markdown
from pipelines.report.plan import check_fits, plan, plan_lines
from pipelines.report.scales import ReportScale, scale
from pipelines.train.tracking import client_for, retrying
from pipelines.tune.settings import SweepSettings
from pipelines.tune.space import planned_trials
from pipelines.tune.sweep import run_sweep

REGISTERED_MODEL = "memlab-report"
# Progress for one sweep: (sweep name, its trials) -> a context yielding Tune callbacks.
Progress = Callable[[str, int | None], AbstractContextManager[list[Any]]]


class SweepInterrupted(RuntimeError):
    """A sweep ended with trials left to run (Ctrl-C); `--resume` finishes it."""


class ReportSettings(Strict):
    scale: str = "cpu"
    name: str | None = Field(default=None, description="default: report-<scale>")
    from_sweep: str | None = Field(default=None, description="read this sweep, run nothing")
    resume: bool = False
    overrides: tuple[str, ...] = ()
    grace_period: int | None = Field(default=None, ge=1, description="default: the scale's")
    storage_path: Path = RUNS_DIR / "tune"
    out: Path | None = Field(default=None, description="default: memlab_runs/reports/<name>")

    @property
    def sweep_name(self) -> str:
        return self.from_sweep or self.name or f"report-{self.scale}"

    @property
    def folder(self) -> Path:
        return self.out or RUNS_DIR / "reports" / self.sweep_name


@dataclass(frozen=True)
class ReportOutcome:
    folder: Path
    report: Path
    files: list[Path]
    parent_run_id: str | None
    frontier: SweepTables
    forgetting: SweepTables
    asha: AshaCompute


Bases = tuple[ReportScale, ExperimentConfig, ExperimentConfig]


def report_bases(settings: ReportSettings) -> Bases:
    """The scale and its two sweeps' base configs with the overrides applied (a bad override
    fails here, before Ray starts)."""
    chosen = scale(settings.scale)
    overrides = list(settings.overrides)
    frontier = apply_overrides(chosen.base_config(), overrides)
    forgetting = apply_overrides(chosen.base_config(forgetting=True), overrides)
    return chosen, frontier.with_absolute_paths(), forgetting.with_absolute_paths()


def dry_run(settings: ReportSettings) -> list[str]:
    """The plan's lines: both sweeps, every grid point checked, no Ray."""
    chosen, _, _ = report_bases(settings)
    return plan_lines(plan(chosen, settings.sweep_name))


def run_report(
    settings: ReportSettings,
    resources: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> ReportOutcome:
    """Run (or with `from_sweep`, read) both sweeps and write the report. `resources` are the
    cluster's (`ray.cluster_resources()`), checked against the scale before any trial."""
    chosen, frontier_base, forgetting_base = report_bases(settings)
    name = settings.sweep_name
    if settings.from_sweep is None:
        check_fits(chosen, resources or {})
    frontier = _sweep_tables(
        frontier_base, chosen.frontier_space(), name, chosen, settings, progress
    )
    forgetting = _sweep_tables(
        forgetting_base, chosen.forgetting_space(), f"{name}-forgetting", chosen, settings, progress
    )
    context = ReportContext(
        scale=chosen,
        name=name,
        command=_command(settings),
        git_commit=_source_commit(),
        tracking_uri=frontier_base.tracking.resolved_uri(),
        plan=plan_lines(plan(chosen, name)),
        grace_period=settings.grace_period or chosen.grace_period,
    )
    return write_report(settings.folder, context, frontier, forgetting)


def _sweep_tables(
    base: ExperimentConfig,
    space: dict[str, Any],
    name: str,
    chosen: ReportScale,
    settings: ReportSettings,
    progress: Progress | None,
) -> SweepTables:
    """Run the sweep (unless reading one) and read it back; an interrupted sweep (Ctrl-C: Tune
    returns what it has) stops the report here, before the next sweep starts."""
    if settings.from_sweep is None:
        _sweep(base, space, name, chosen, settings, progress)
    tables = read_sweep(settings.storage_path.resolve() / name, base)
    if tables.unfinished and settings.from_sweep is None:
        raise SweepInterrupted(
            f"sweep {name} stopped with {tables.unfinished} trial(s) unfinished; run the same "
            "command with --resume to finish it (finished trials are not redone)"
        )
    return tables


def _sweep(
    base: ExperimentConfig,
    space: dict[str, Any],
    name: str,
    chosen: ReportScale,
    settings: ReportSettings,
    progress: Progress | None,
) -> None:
    sweep = SweepSettings(
        name=name,
        scheduler="asha",
        grace_period=settings.grace_period or chosen.grace_period,
        registered_model=REGISTERED_MODEL,
        storage_path=settings.storage_path,
    )
    shown = progress(name, planned_trials(space)) if progress else nullcontext([])
    with shown as callbacks:
        run_sweep(base, space, sweep, resume=settings.resume, callbacks=callbacks or None)


def write_report(
    folder: Path, context: ReportContext, frontier: SweepTables, forgetting: SweepTables
) -> ReportOutcome:
    """Figures, tables and report.md into `folder`, then all of it into the MQAR sweep's
    parent run (under `report/`)."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = frontier.trials.assign(pareto=pareto_front(frontier.trials))
    front = trials[trials["pareto"]].sort_values("state_bytes")
    asha = asha_compute(frontier.trials, frontier.epochs)
    policies = eviction_frontier(
        frontier.trials, context.tracking_uri, context.scale.eviction_fractions
    )
    files = [
        figures.frontier(trials, folder / "frontier.png", _title(context)),
        figures.configuration_heat_map(trials, folder / "accuracy_by_configuration.png"),
        _csv(trials, folder / "trials.csv"),
        _csv(by_configuration(trials), folder / "accuracy_by_configuration.csv"),
    ]
    if not forgetting.trials.empty:
        files += [
            figures.forgetting_heat_map(forgetting.trials, folder / "forgetting.png"),
            _csv(threshold_effect(forgetting.trials), folder / "forgetting.csv"),
            _csv(forgetting.trials, folder / "forgetting_trials.csv"),
        ]
    if not policies.empty:
        files += [
            figures.eviction(policies, trials, folder / "eviction.png"),
            _csv(policies, folder / "eviction.csv"),
        ]
    report = folder / "report.md"
    report.write_text(report_markdown(context, frontier, forgetting, front, asha, policies))
    files.append(report)
    if frontier.parent_run_id:
        _log(context.tracking_uri, frontier.parent_run_id, files)
    return ReportOutcome(folder, report, files, frontier.parent_run_id, frontier, forgetting, asha)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _log(tracking_uri: str, run_id: str, files: list[Path]) -> None:
    client = client_for(tracking_uri)
    for path in files:
        retrying(lambda path=path: client.log_artifact(run_id, str(path), "report"))


def _source_commit() -> str:
    """The commit of the code that ran, wherever the command ran from (MLflow's `git_commit`
    asks the working directory)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _title(context: ReportContext) -> str:
    return f"MQAR accuracy against state size (memlab report, scale {context.scale.name})"


def _command(settings: ReportSettings) -> str:
    """The command that runs these sweeps (also for a report read with --from-sweep)."""
    words = ["memlab", "report", "--scale", settings.scale]
    if settings.sweep_name != f"report-{settings.scale}":
        words += ["--name", settings.sweep_name]
    words += ["--grace-period", str(settings.grace_period)] if settings.grace_period else []
    return " ".join(words + list(settings.overrides))
