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
    max_context_tokens: int = Field(default=65_536, ge=1, description="one encode request")
    max_sequences_per_request: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    request_timeout_s: float = Field(default=30.0, gt=0)


class SessionSettings(Strict):
    """The shared session store (bounded in count and bytes; idle sessions expire) and the hot
    copies model replicas keep.

    `lock_wait_s`: how long an update waits for another update of the same session in its replica
    before it is refused with 409 and a retry hint. `recent_requests`: idempotency keys remembered
    per session, so a retried append is answered, not applied twice. `affinity`: route a session's
    requests to the replica that holds its hot copy (Serve's model multiplexing keyed by session);
    `hot_bytes_per_replica` bounds those copies.
    """

    max_sessions: int = Field(default=10_000, ge=1)
    max_total_bytes: int = Field(default=1 << 30, ge=1)
    max_session_bytes: int = Field(default=64 << 20, ge=1)
    idle_ttl_s: float = Field(default=3600.0, gt=0)
    lock_wait_s: float = Field(default=5.0, ge=0)
    recent_requests: int = Field(default=64, ge=0)
    affinity: bool = True
    hot_bytes_per_replica: int = Field(default=256 << 20, ge=0)


class BatchSettings(Strict):
    """Dynamic batching across requests and sessions (`@serve.batch`); off: one forward each."""

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    wait_timeout_s: float = Field(default=0.002, ge=0)


class DeploymentSettings(Strict):
    """Replica options used when no Serve config file overrides them (`serve run`, `memlab
    serve`); a config file's `deployments:` section takes precedence, as Serve defines.

    The replica counts and limits are the model deployment's; the ingress has its own two.
    """

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    replica_cpus: float = Field(default=1.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_max_ongoing_requests: int = Field(default=256, ge=1)

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
    training_state.pt).

    The API key: when one is set, every endpoint but `/healthz` (the docs and `/openapi.json`
    included) needs it in the `X-API-Key` header. It is taken, first found, from `api_key`, from
    the file `api_key_file` names (read where the application runs: on a cluster, a mounted
    secret), or from `MEMLAB_API_KEY` in the environment of the process that builds the
    application or of its ingress replica (`serve deploy` builds it on the cluster: the shell's
    variables never reach it; give it through `api_key_file` or the config's
    `runtime_env.env_vars`). Serve logs a config file's args: never write the key itself there.
    Without a key the application refuses to start on an HTTP host beyond loopback.
    """

    model_uri: str = DEFAULT_MODEL_URI
    tracking_uri: str | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    limits: Limits = Field(default_factory=Limits)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    batching: BatchSettings = Field(default_factory=BatchSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)

    def resolved(self) -> ServeArgs:
        """Settle, in the process that builds the app, what depends on its environment: the
        tracking URI (absolute: replicas run elsewhere), a checkpoint path, the API key."""
        tracking = TrackingSettings(tracking_uri=self.tracking_uri)
        update: dict = {"tracking_uri": tracking.resolved_uri()}
        if is_local_path(self.model_uri):
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
        """Whether a key is configured (the file is read only where the application runs)."""
        return self.api_key is not None or self.api_key_file is not None

    def read_api_key(self) -> str | None:
        """The key, by the order in the class docstring; a named file that cannot be read is an
        error, never a silent fall back to no key."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return _read_key_file(self.api_key_file.expanduser())
        return os.environ.get(API_KEY_ENV, "").strip() or None


def _read_key_file(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise ValueError(
            f"api_key_file {path} cannot be read ({error.strerror}): create it (mode 600) or mount "
            "the secret there"
        ) from None
    if not key:
        raise ValueError(f"api_key_file {path} is empty: write the key into it")
    return key


def is_local_path(uri: str) -> bool:
    """A model URI that names a checkpoint folder rather than an MLflow model."""
    return "://" not in uri and not uri.startswith(("models:/", "runs:/"))
