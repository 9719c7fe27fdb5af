"""`ServeArgs`: everything the application builder takes, typed, frozen and strict.

The model's own hyperparameters are not here: the server rebuilds the model from the experiment
config stored with its weights. What is here is how to serve it: where it is, who may call, how
much one request may ask, how sessions are kept and how requests are batched and scaled.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipelines.experiment import TrackingSettings

API_KEY_ENV = "MEMLAB_API_KEY"
DEFAULT_MODEL_URI = "models:/memlab-champion@champion"


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(Strict):
    """What one request may ask. Beyond a limit the answer is 413 (size) or 422 (a bad value)."""

    max_tokens_per_request: int = Field(default=4096, ge=1)
    max_sequences_per_request: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    request_timeout_s: float = Field(default=30.0, gt=0)


class SessionSettings(Strict):
    """The shared session store: bounded in count and bytes, idle sessions expire.

    `lock_wait_s`: how long an append waits for another append to the same session to finish
    before it is refused with 409 and a retry hint.
    """

    max_sessions: int = Field(default=10_000, ge=1)
    max_total_bytes: int = Field(default=1 << 30, ge=1)
    max_session_bytes: int = Field(default=64 << 20, ge=1)
    idle_ttl_s: float = Field(default=3600.0, gt=0)
    lock_wait_s: float = Field(default=5.0, ge=0)
    store_name: str | None = Field(
        default=None, description="named Ray actor holding the states; default: per application"
    )


class BatchSettings(Strict):
    """Dynamic batching across requests and sessions (`@serve.batch`); off: one forward each."""

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    wait_timeout_s: float = Field(default=0.002, ge=0)


class DeploymentSettings(Strict):
    """Replica options used when no Serve config file overrides them (`serve run`, `memlab
    serve`); a config file's `deployments:` section takes precedence, as Serve defines."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    replica_cpus: float = Field(default=1.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> DeploymentSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        return self


class ServeArgs(Strict):
    """Arguments of `serve.app:build_app`.

    `model_uri`: any MLflow model URI of a memlab model (`models:/name@alias`, `models:/name/3`,
    `runs:/<run>/model`, `models:/m-<id>`) or a checkpoint folder (experiment.json +
    training_state.pt). `api_key`: when set (here or in `MEMLAB_API_KEY`), every endpoint but
    the health check needs it in the `X-API-Key` header (the docs too). memlab never prints or
    logs it, but Serve logs the args of a config file: there, use the environment variable.
    """

    model_uri: str = DEFAULT_MODEL_URI
    tracking_uri: str | None = None
    api_key: SecretStr | None = None
    limits: Limits = Field(default_factory=Limits)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    batching: BatchSettings = Field(default_factory=BatchSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)

    def resolved(self) -> ServeArgs:
        """Settle, in the process that builds the app, what depends on its environment: the
        tracking URI (absolute: replicas run elsewhere), a checkpoint path, the API key."""
        tracking = TrackingSettings(tracking_uri=self.tracking_uri)
        update: dict = {"tracking_uri": tracking.resolved_uri()}
        if _is_path(self.model_uri):
            update["model_uri"] = str(Path(self.model_uri).expanduser().resolve())
        from_env = os.environ.get(API_KEY_ENV, "").strip()
        if self.api_key is None and from_env:
            update["api_key"] = SecretStr(from_env)
        return self.model_copy(update=update)

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("api_key is blank: give a key, or leave it unset for no key")
        return key

    @property
    def requires_api_key(self) -> bool:
        return self.api_key is not None


def _is_path(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("models:/") and not uri.startswith("runs:/")
