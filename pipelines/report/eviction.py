"""The eviction frontier of a report: the sweep's best full-attention model, read back from its
MLflow run, scored under every eviction policy of `memory_models.attention` at caches of a
fraction of the longest training row, on the report's test configurations.

Every memory is chunk invariant, so a whole-row score is what a served session gets. The weights
are the ones trained with the full cache: the rows say what each policy keeps of a model that
never learned to live with it (the sweep's own bounded trials say what training with a bound
gives).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import get_args

import mlflow
import pandas as pd
import torch

from memory_models.attention import EvictionPolicy, sinks_for
from pipelines.checkpoint import load_model
from pipelines.data import tasks
from pipelines.experiment import ExperimentConfig, apply_overrides
from pipelines.report.analysis import CONFIG_METRIC, METRIC
from pipelines.train.logged_model import CHECKPOINT_ARTIFACT
from pipelines.train.loop import evaluate

POLICIES: tuple[str, ...] = get_args(EvictionPolicy)
TEST_SEED = 1  # the rows scored here; the sweep's own test rows are not stored with the run
ROWS_PER_BATCH = 64


def eviction_frontier(
    trials: pd.DataFrame, tracking_uri: str, fractions: tuple[float, ...], rows: int = 256
) -> pd.DataFrame:
    """One row per policy x budget (and the full cache): memory size, state bytes, accuracy
    (mean and per test configuration). Empty when the sweep has no finished full-attention trial
    with a logged model."""
    run_id = _best_full_attention(trials)
    if run_id is None:
        return pd.DataFrame()
    model, config = _load(run_id, tracking_uri)
    batches = _test_batches(config, rows)
    longest = max(part.seq_len for part in config.data.task.parts)
    scored = [_score(model, config, batches, {"eviction": "window", "memory_size": None})]
    for policy in POLICIES:
        for fraction in fractions:
            budget = max(2, round(longest * fraction))
            memory = {"eviction": policy, "memory_size": budget}
            if policy == "sinks":
                memory["sinks"] = sinks_for(budget)
            scored.append(_score(model, config, batches, memory) | {"fraction": fraction})
    return pd.DataFrame(scored).assign(mlflow_run_id=run_id)


def _best_full_attention(trials: pd.DataFrame) -> str | None:
    if trials.empty:
        return None
    full = trials[
        (trials["mechanism"] == "attention")
        & trials["memory_size"].isna()
        & (trials["status"] == "ok")
        & trials["mlflow_run_id"].notna()
    ]
    if full.empty:
        return None
    return str(full.sort_values(METRIC).iloc[-1]["mlflow_run_id"])


def _load(run_id: str, tracking_uri: str) -> tuple[torch.nn.Module, ExperimentConfig]:
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=CHECKPOINT_ARTIFACT,
            dst_path=folder,
            tracking_uri=tracking_uri,
        )
        return load_model(Path(path))


def _test_batches(config: ExperimentConfig, rows: int) -> list[dict[str, torch.Tensor]]:
    columns = tasks.generate(config.data.task.test_task(), rows, TEST_SEED)
    every = {name: torch.as_tensor(values) for name, values in columns.items()}
    return [
        {name: tensor[start : start + ROWS_PER_BATCH] for name, tensor in every.items()}
        for start in range(0, rows, ROWS_PER_BATCH)
    ]


def _score(model, config: ExperimentConfig, batches, memory: dict) -> dict:
    """The trained weights under another memory setting of the same kind (eviction sizes no
    weight), scored whole row by whole row."""
    changes = {f"model.memory.{key}": value for key, value in memory.items()}
    moved = apply_overrides(config, changes)
    evicting = moved.model.build()
    evicting.load_state_dict(model.state_dict())
    metrics = evaluate(evicting, batches, task_kind=config.data.task.kind)
    return {
        "policy": memory["eviction"] if memory["memory_size"] else "full",
        "memory_size": memory["memory_size"],
        "state_bytes": moved.state_bytes_per_sequence(evicting),
        METRIC: metrics["accuracy"],
        **{
            f"val_{key}": value
            for key, value in metrics.items()
            if CONFIG_METRIC.match(f"val_{key}")
        },
    }
