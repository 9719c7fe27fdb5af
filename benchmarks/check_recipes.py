"""Does every shipped recipe learn what it claims? Each claimed recipe trained with its defaults.

A recipe whose description states an accuracy carries that claim in `pipelines.recipes.CLAIMS`
(metric, threshold, mechanism). This script trains each such recipe exactly as
`memlab train --recipe NAME` would (`pipelines.train.driver.train` on a private local Ray, its own
MLflow SQLite store, storage and data cache in a temporary folder), reads the final metrics and
prints one row per recipe: the claim, the measured value, steps, wall time and whether it holds.
It asserts nothing and times nothing against a limit: a claim that fails is a row that says so,
and the exit code is 1 so a script can notice.

Run from the repository root: `.venv/bin/python benchmarks/check_recipes.py [--recipes NAME...]`.
All claimed recipes take about 15 minutes on 2 cores; `--quick` runs each for a few steps only
(a smoke run of the code path: its claims are not expected to hold).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from bench_common import format_table, log, machine_info, parse_with_quick, run_each, write_results

from pipelines.experiment import ExperimentConfig, apply_overrides, outputs_under
from pipelines.recipes import CLAIMS, Claim, recipe
from pipelines.train.driver import planned_steps, train

QUICK = {"max_steps": 4}
NOTE = (
    "each recipe trained with its defaults through pipelines.train.driver.train (what `memlab "
    "train --recipe NAME` runs), on a private local Ray; measured = the final epoch's value of "
    "the claimed metric on the recipe's test split; steps = optimizer steps per worker; wall s = "
    "the whole train() call, data preparation and Ray Train start-up included."
)


@dataclasses.dataclass(frozen=True)
class Row:
    recipe: str
    kind: str
    metric: str
    at_least: float
    measured: float
    steps: int | None
    wall_seconds: float
    holds: bool


def configured(name: str, root: Path, max_steps: int | None) -> ExperimentConfig:
    """The recipe's defaults, with only where it writes moved into `root` (and, for a smoke run,
    the steps capped)."""
    overrides: dict[str, object] = {
        **outputs_under(root),
        "run.name": f"check-{name}",
    }
    if max_steps is not None:
        overrides["train.max_steps_per_epoch"] = max_steps
    return apply_overrides(recipe(name), overrides)


def check(name: str, claim: Claim, root: Path, max_steps: int | None) -> Row:
    config = configured(name, root, max_steps)
    started = time.perf_counter()
    outcome = train(config)
    measured = float(outcome.metrics.get(claim.metric, float("nan")))
    return Row(
        recipe=name,
        kind=config.model.memory.kind,
        metric=claim.metric,
        at_least=claim.at_least,
        measured=measured,
        steps=planned_steps(config),
        wall_seconds=time.perf_counter() - started,
        holds=measured >= claim.at_least,
    )


def table(rows: list[Row]) -> str:
    headers = ["recipe", "kind", "metric", "claim", "measured", "steps", "wall s", "holds"]
    cells = [
        [
            row.recipe,
            row.kind,
            row.metric,
            f">= {row.at_least:.2f}",
            f"{row.measured:.3f}",
            "-" if row.steps is None else f"{row.steps:,}",
            f"{row.wall_seconds:.0f}",
            "yes" if row.holds else "NO",
        ]
        for row in rows
    ]
    return format_table(headers, cells, left=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(CLAIMS), help="default: all")
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch")
    parser.add_argument("--quick", action="store_true", help="a few steps each: a smoke run")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.recipes or sorted(CLAIMS)
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=True,  # Train's placement-group cleanup needs the state API
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="memlab-check-recipes-") as folder:
            rows = run_each(
                names, lambda name: check(name, CLAIMS[name], Path(folder), args.max_steps)
            )
    finally:
        ray.shutdown()
    log(table(rows))
    log(NOTE)
    write_results(
        "check_recipes.json",
        machine_info(),
        {"recipes": names, "max_steps_per_epoch": args.max_steps},
        rows,
        NOTE,
    )
    return 0 if all(row.holds for row in rows) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
