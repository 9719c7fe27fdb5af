"""A sweep in MLflow: its parent run, and its winners in the model registry.

The best trial's model becomes version N of `settings.registered_model` with alias `champion`; the
best of each mechanism gets alias `best_<mechanism>`. Version tags use the results table's names.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd

from pipelines.experiment import ExperimentConfig
from pipelines.train.tracking import client_for, experiment_id, git_commit, log_config, retrying
from pipelines.tune.results import plain
from pipelines.tune.settings import SweepSettings

SWEEP_TAG = "memlab.sweep"
CHAMPION_ALIAS = "champion"
VERSION_TAGS = ("mechanism", "memory_size", "forget_threshold", "val_accuracy", "state_bytes")


def open_parent_run(base: ExperimentConfig, settings: SweepSettings) -> str:
    """The sweep's parent run; an interrupted sweep of the same name gets its old one back."""
    client = client_for(base.tracking.resolved_uri())
    exp = experiment_id(client, base)
    found = client.search_runs([exp], filter_string=f"tags.`{SWEEP_TAG}` = '{settings.name}'")
    if found:
        return found[0].info.run_id
    tags = {
        SWEEP_TAG: settings.name,
        "mlflow.runName": f"sweep-{settings.name}",
        "git_commit": git_commit(),
        "task": base.data.task.kind,
    }
    run = retrying(lambda: client.create_run(exp, tags=tags, run_name=f"sweep-{settings.name}"))
    log_config(client, run.info.run_id, base)
    retrying(lambda: client.log_param(run.info.run_id, "sweep", settings.model_dump_json()))
    return run.info.run_id


def register_champions(client, table: pd.DataFrame, settings: SweepSettings):
    """Best trial -> alias `champion`; best per mechanism -> alias `best_<mechanism>`.

    Returns `(champion row as a dict, its version)`, or `({}, None)` when no trial has a model.
    """
    ranked = table.dropna(subset=["model_uri", settings.metric])
    if ranked.empty:
        return {}, None
    ranked = ranked.sort_values(settings.metric, ascending=settings.mode == "min")
    name = settings.registered_model
    champion_version = None
    for position, (_, row) in enumerate(ranked.drop_duplicates("mechanism").iterrows()):
        version = _register(client, name, row, settings)
        aliases = [f"best_{row['mechanism']}"] + ([CHAMPION_ALIAS] if position == 0 else [])
        for alias in aliases:
            retrying(lambda a=alias, v=version: client.set_registered_model_alias(name, a, v))
        if position == 0:
            champion_version = version
    champion = {k: plain(v) for k, v in ranked.iloc[0].to_dict().items()} | {
        "registered_model": name,
        "version": champion_version,
        "uri": f"models:/{name}@{CHAMPION_ALIAS}",
    }
    return champion, champion_version


def _register(client, name: str, row: pd.Series, settings: SweepSettings) -> str:
    version = retrying(lambda: mlflow.register_model(row["model_uri"], name)).version
    description = (
        f"sweep {settings.name}: {row['mechanism']} memory_size={row['memory_size']} "
        f"forget_threshold={row['forget_threshold']} {settings.metric}={row[settings.metric]:.4f} "
        f"state_bytes={row['state_bytes']}"
    )
    retrying(lambda: client.update_model_version(name, version, description=description))
    for key in VERSION_TAGS:
        value = json.dumps(plain(row[key]))
        retrying(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v))
    retrying(lambda: client.set_model_version_tag(name, version, "sweep", settings.name))
    return version
