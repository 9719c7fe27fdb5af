"""The served model: found in MLflow (or a checkpoint folder) and rebuilt from its own config.

Every memlab model is logged with its checkpoint folder (artifact `checkpoint/`: experiment.json
and the weights, see `pipelines.train.logged_model.log_sequence_model`). The server downloads that
folder and rebuilds the `TokenModel` from the experiment config in it, the same way training
resumes, so nothing about the model is restated in deployment files and the pickled copy's class
layout never matters.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_models.architectures import TokenModel
from pipelines.checkpoint import CONFIG_FILE, is_checkpoint, load_model, read_config
from pipelines.experiment import ExperimentConfig
from pipelines.train.logged_model import CHECKPOINT_ARTIFACT
from serve.args import is_local_path

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ModelLoadError(RuntimeError):
    """The model URI does not lead to a memlab model the server can rebuild."""


@dataclass(frozen=True)
class Provenance:
    """Where the served weights came from (empty for a plain checkpoint folder)."""

    model_uri: str
    run_id: str | None = None
    registered_model: str | None = None
    version: str | None = None
    version_tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    model: TokenModel
    config: ExperimentConfig
    provenance: Provenance

    @property
    def model_id(self) -> str:
        """Identifies the weights: a session made by other weights is refused."""
        return self.provenance.run_id or self.provenance.model_uri

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def reads_bytes(self) -> bool:
        """A byte-level model (vocabulary 256) reads UTF-8 text as tokens."""
        return self.vocab_size == 256


def load_served_model(model_uri: str, tracking_uri: str | None) -> ServedModel:
    """Rebuild the model behind `model_uri` (an MLflow model URI or a checkpoint folder)."""
    if Path(model_uri).is_dir():
        model, config = load_model(Path(model_uri))
        return ServedModel(model.eval(), config, Provenance(model_uri))
    provenance = _provenance(model_uri, tracking_uri)
    model, config = _download_and_rebuild(provenance, tracking_uri)
    return ServedModel(model.eval(), config, provenance)


def load_served_config(model_uri: str, tracking_uri: str | None) -> ExperimentConfig:
    """The served model's experiment config alone (no weights): what the ingress needs to check
    requests against the model (its vocabulary, whether it reads text)."""
    if Path(model_uri).is_dir():
        return read_config(Path(model_uri))
    import mlflow

    provenance = _provenance(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(
            run_id=provenance.run_id,
            artifact_path=f"{CHECKPOINT_ARTIFACT}/{CONFIG_FILE}",
            dst_path=folder,
            tracking_uri=tracking_uri,
        )
        return ExperimentConfig.model_validate_json(Path(path).read_text())


def served_name(model_uri: str) -> str:
    """The name clients call the model by (the OpenAI API's `model`): the registered model's
    name, a checkpoint folder's name, else `memlab`."""
    if match := _ALIAS_URI.match(model_uri) or _VERSION_URI.match(model_uri):
        return match["name"]
    if is_local_path(model_uri):
        return Path(model_uri).name
    return "memlab"


def check_model_uri(model_uri: str, tracking_uri: str | None) -> None:
    """Fail fast, before any replica starts, when `model_uri` leads nowhere."""
    if Path(model_uri).is_dir():
        if not is_checkpoint(Path(model_uri)):
            raise ModelLoadError(f"{model_uri} is a folder but not a memlab checkpoint")
        return
    _provenance(model_uri, tracking_uri)


def _provenance(model_uri: str, tracking_uri: str | None) -> Provenance:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot find model {model_uri!r} in MLflow at {tracking_uri}: {error}. "
            "Register one (memlab tune registers its champion) or give a checkpoint folder"
        ) from error
    if info.run_id is None:
        raise ModelLoadError(f"model {model_uri!r} was not logged from a run; no checkpoint")
    name, version, tags = _registry_entry(client, model_uri)
    return Provenance(
        model_uri=model_uri,
        run_id=info.run_id,
        registered_model=name,
        version=version,
        version_tags=tags,
        metrics=dict(client.get_run(info.run_id).data.metrics),
    )


def _registry_entry(client, model_uri: str) -> tuple[str | None, str | None, dict[str, str]]:
    """Registered name, version and version tags when the URI names a registry entry."""
    if match := _ALIAS_URI.match(model_uri):
        found = client.get_model_version_by_alias(match["name"], match["alias"])
    elif match := _VERSION_URI.match(model_uri):
        found = client.get_model_version(match["name"], match["version"])
    else:
        return None, None, {}
    return found.name, str(found.version), dict(found.tags)


def _download_and_rebuild(
    provenance: Provenance, tracking_uri: str | None
) -> tuple[TokenModel, ExperimentConfig]:
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=provenance.run_id,
                artifact_path=CHECKPOINT_ARTIFACT,
                dst_path=folder,
                tracking_uri=tracking_uri,
            )
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise ModelLoadError(
                f"run {provenance.run_id} of model {provenance.model_uri!r} has no readable "
                f"'{CHECKPOINT_ARTIFACT}/' artifact ({error}); log models with "
                "pipelines.train.logged_model.log_sequence_model"
            ) from error
        return load_model(Path(path))


def card_config(config: ExperimentConfig) -> dict[str, Any]:
    """What the model card shows of the config: the model, its task and how it was trained
    (not local paths or tracking settings)."""
    return {
        "recipe": config.recipe,
        "model": config.model.model_dump(mode="json"),
        "task": config.data.task.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
    }


def state_bytes_per_sequence(served: ServedModel) -> int:
    return served.config.state_bytes_per_sequence(served.model)
