"""The experiment config: everything one training run needs, typed, frozen and JSON-round-trippable.

A recipe (`pipelines/recipes.py`) returns one; the CLI applies dotted overrides
(`model.memory.memory_size=64`); Tune samples points into it; the checkpoint and the MLflow run
store it, so a run can always be rebuilt from what it logged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memory_models.architectures import ARCHITECTURES, AnyModelConfig
from memory_models.layer import MemoryConfig
from pipelines.data.config import SEQ2SEQ_KINDS, DataConfig
from pipelines.train.capacity import CapacitySettings, refuse_shape_bound

RUNS_DIR = Path("memlab_runs")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainSettings(Strict):
    """Optimisation. `segment_len=None` trains on whole rows; an int cuts rows for TBPTT."""

    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=32, ge=1, description="rows per worker per step")
    segment_len: int | None = Field(default=None, ge=1)
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    max_eval_batches: int | None = Field(default=8, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(default=1.0, ge=0)
    aux_loss_weight: float = Field(default=1.0, ge=0)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    fail_once_at_step: int | None = Field(
        default=None, ge=1, description="fault injection: crash once at this step (resume tests)"
    )
    log_every_steps: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)
    #: `policy=loss` moves a shape-free memory_size during the run (`pipelines.train.capacity`).
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)


class ScalingSettings(Strict):
    """How many Train workers and what each asks of Ray. Fractional CPUs keep 2-core machines
    from deadlocking (a Data task or a Tune driver must still find a CPU)."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)
    mixed_precision: bool = Field(default=True, description="bf16 autocast on GPU")


class TrackingSettings(Strict):
    """MLflow. `tracking_uri=None`: `MLFLOW_TRACKING_URI`, else a SQLite store in `memlab_runs/`."""

    tracking_uri: str | None = None
    experiment: str = "memlab"

    def resolved_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        return f"sqlite:///{(RUNS_DIR / 'mlflow.db').resolve()}"

    def artifact_location(self) -> str | None:
        """Beside a SQLite store, a local `mlartifacts/` folder; a server decides its own."""
        uri = self.resolved_uri()
        if not uri.startswith("sqlite:///"):
            return None
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


class RunSettings(Strict):
    """Ray run identity. The same `name` in the same `storage_path` resumes the earlier run."""

    name: str | None = None
    storage_path: Path = RUNS_DIR / "ray"
    max_failures: int = Field(default=1, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)


class ExperimentConfig(Strict):
    recipe: str = "custom"
    model: AnyModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _vocabulary_covers_the_data(self) -> ExperimentConfig:
        need = self.data.task.vocab_size
        if self.model.vocab_size < need:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the task's vocabulary "
                f"({need}); set model.vocab_size={need}"
            )
        return self

    @model_validator(mode="after")
    def _architecture_fits_the_task(self) -> ExperimentConfig:
        seq2seq = self.data.task.kind in SEQ2SEQ_KINDS
        encoder_decoder = self.model.architecture == "encoder_decoder"
        if seq2seq and not encoder_decoder:
            raise ValueError(
                f"task {self.data.task.kind!r} is sequence-to-sequence (its rows have a context "
                "to encode); set model.architecture=encoder_decoder"
            )
        if encoder_decoder and not seq2seq:
            raise ValueError(
                f"model.architecture=encoder_decoder needs a task with a context, and "
                f"{self.data.task.kind!r} has none; pick a seq2seq_* task, or "
                "model.architecture=decoder_only"
            )
        return self

    @model_validator(mode="after")
    def _capacity_can_move(self) -> ExperimentConfig:
        if self.train.capacity.active:
            refuse_shape_bound(
                self.model.memory.kind,
                "memory_size",
                asked_by=f"train.capacity.policy={self.train.capacity.policy}",
                fix="Set train.capacity.policy=fixed, or pick another model.memory.kind",
            )
            if self.model.memory.memory_size is None:
                raise ValueError(
                    "train.capacity.policy=loss starts from model.memory.memory_size, which is "
                    "None (unbounded): set it, e.g. model.memory.memory_size=8"
                )
        return self

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.recipe}-{self.model.memory.kind}"

    def state_bytes_per_sequence(self, model: Any = None) -> int:
        """The memory one sequence holds after a row of the task (and, for a sequence-to-sequence
        task, its encoded context): the x axis of the accuracy-versus-state-size picture."""
        model = model if model is not None else self.model.build()
        task = self.data.task
        context = getattr(task, "context_width", None)
        if context is None:
            return model.state_size_bytes(task.row_width)
        return model.state_size_bytes(task.row_width, context_len=context)

    def with_absolute_paths(self) -> ExperimentConfig:
        """Ray workers and Tune trials run in other working directories: pin every relative
        path (data cache, run storage, the default SQLite store) to this process's directory."""
        data = self.data.model_copy(update={"cache_dir": self.data.cache_dir.resolve()})
        run = self.run.model_copy(update={"storage_path": self.run.storage_path.resolve()})
        tracking = self.tracking.model_copy(update={"tracking_uri": self.tracking.resolved_uri()})
        return self.model_copy(update={"data": data, "run": run, "tracking": tracking})

    def flat(self) -> dict[str, str]:
        """Dotted keys to strings: MLflow params and the results table."""
        return {key: json.dumps(value) for key, value in _flatten(self.model_dump(mode="json"))}


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        out = []
        for key, inner in value.items():
            out += _flatten(inner, f"{prefix}{key}.")
        return out
    return [(prefix.rstrip("."), value)]


class OverrideError(ValueError):
    """A dotted override that does not fit the experiment config."""


def outputs_under(root: Path) -> dict[str, str]:
    """Overrides that put everything a run writes under `root`: the MLflow store (SQLite), Ray's
    run storage and the data cache. For throwaway runs: tests, benchmarks, experiments."""
    return {
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "run.storage_path": str(root / "ray"),
        "data.cache_dir": str(root / "data"),
    }


def apply_overrides(
    config: ExperimentConfig, overrides: dict[str, Any] | list[str]
) -> ExperimentConfig:
    """`{"model.memory.memory_size": 64}` or `["model.memory.memory_size=64"]` applied and
    re-validated; a misspelt path or an impossible value names the key and what it accepts."""
    pairs = _parse_pairs(overrides) if isinstance(overrides, list) else dict(overrides)
    data = config.model_dump(mode="json")
    for key, value in pairs.items():
        _set_path(data, key, value)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise OverrideError(_explain(error, pairs)) from None


def _parse_pairs(items: list[str]) -> dict[str, Any]:
    pairs = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OverrideError(f"override {item!r} is not key=value (e.g. train.lr=0.001)")
        pairs[key.strip()] = _parse_value(raw.strip())
    return pairs


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a bare word is a string: kind=gru


def _set_path(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            where = ".".join(parts[: depth + 1])
            raise OverrideError(f"unknown config path {where!r} in {key!r}; known here: {known}")
        node = child
    if parts[-1] not in node and not _may_add(parts, node):
        known = ", ".join(sorted(node))
        raise OverrideError(f"unknown config key {key!r}; known at this level: {known}")
    node[parts[-1]] = value
    if parts[-1] == "architecture" and parts[:-1] == ["model"]:
        _keep_fields_of(node, ARCHITECTURES.get(value))
    if parts[-1] == "kind" and parts[-2:-1] == ["memory"]:
        # A new mechanism: drop the old one's own fields, keep those every mechanism has.
        for name in list(node):
            if name not in MemoryConfig.model_fields:
                del node[name]


def _keep_fields_of(node: dict, config_class: type[BaseModel] | None) -> None:
    """A new architecture: drop the old one's own fields and write the new one's defaults, so
    later overrides in the same list can reach into them (`model.cross_memory.memory_size`)."""
    if config_class is None:
        return  # an unknown architecture: validation names it
    fields = config_class.model_fields
    for name in list(node):
        if name not in fields:
            del node[name]
    for name, field in fields.items():
        if name not in node and not field.is_required():
            default = field.get_default(call_default_factory=True)
            node[name] = (
                default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            )


def _may_add(parts: list[str], node: dict) -> bool:
    """Fields left at their default after a `kind` or `architecture` switch are absent."""
    return "kind" in node or "architecture" in node


def _explain(error: ValidationError, pairs: dict[str, Any]) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        lines.append(f"{path}: {item['msg']}")
    given = ", ".join(f"{k}={v!r}" for k, v in pairs.items()) or "(no overrides)"
    return "invalid experiment config (" + given + "):\n  " + "\n  ".join(lines)


def load_config(path: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(path.read_text())
