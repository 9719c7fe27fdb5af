"""What a sweep is asked to do (`SweepSettings`) and what it produced (`SweepOutcome`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipelines.experiment import RUNS_DIR


class SweepSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "sweep"
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(default=1, ge=1, description="repeats of the grid / random samples")
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs before a trial may stop")
    perturbation_interval: int = Field(
        default=1, ge=1, description="PBT: epochs between exploit/explore steps"
    )
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    trial_retries: int = Field(default=1, ge=0)
    registered_model: str = "memlab-champion"
    storage_path: Path = RUNS_DIR / "tune"


@dataclass(frozen=True)
class SweepOutcome:
    table: pd.DataFrame
    table_path: Path
    plot_paths: list[Path]
    parent_run_id: str
    champion_version: str | None
    champion: dict[str, Any]
