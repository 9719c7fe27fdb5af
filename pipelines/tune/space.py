"""Search spaces keyed by experiment-config paths, checked against the config before any trial.

A space is `{"model.memory.memory_size": {"grid": [16, 64]}, "train.lr": {"loguniform": [1e-4,
1e-2]}}`. Every grid/choice value and both ends of every range are applied to the base config
first, so a misspelt key or an impossible value fails at once, naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from ray import tune

from memory_models.registry import REGISTRY
from pipelines.experiment import ExperimentConfig, OverrideError, apply_overrides


class SpaceError(ValueError):
    """A search space that does not fit the experiment config."""


class Dimension(BaseModel):
    """Exactly one of the four forms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [
            name for name in ("grid", "choice", "loguniform", "uniform") if getattr(self, name)
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid/choice/loguniform/uniform, got {given}")
        low, high = self.loguniform or self.uniform or (0.0, 1.0)
        if low > high or (self.loguniform and low <= 0):
            raise ValueError(f"range [{low}, {high}] is empty (or not positive for loguniform)")
        return self

    def probe_values(self) -> list[Any]:
        """The values to try against the config: all discrete ones, the ends of a range."""
        return list(self.grid or self.choice or self.loguniform or self.uniform or [])

    def to_tune(self):
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.uniform(*self.uniform)


def parse_space(raw: dict[str, Any], base: ExperimentConfig) -> dict[str, Dimension]:
    """Validate `raw` into dimensions and probe each against `base`."""
    space = {}
    for key, value in raw.items():
        try:
            space[key] = Dimension.model_validate(value)
        except ValueError as error:
            raise SpaceError(f"search space key {key!r}: {error}") from None
    for key, dimension in space.items():
        for value in dimension.probe_values():
            try:
                apply_overrides(base, {key: value})
            except OverrideError as error:
                raise SpaceError(f"search space key {key!r} value {value!r}: {error}") from None
    return space


def tune_param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """Flat dotted keys stay flat: a trial's config is exactly its dict of overrides."""
    return {key: dimension.to_tune() for key, dimension in space.items()}


def grid_size(space: dict[str, Dimension]) -> int:
    size = 1
    for dimension in space.values():
        if dimension.grid is not None:
            size *= len(dimension.grid)
    return size


MEMORY_GRID_KEYS = (
    "model.memory.kind",
    "model.memory.memory_size",
    "model.memory.forget_threshold",
)


def grid_space(
    kinds: Sequence[str] = (),
    memory_sizes: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw space of `memlab tune -k/-m/-t` and `memlab run`: a grid over the memory's kind,
    size and forget threshold (each given axis), plus `extra` dimensions, which win on a clash."""
    grid = {
        key: {"grid": list(values)}
        for key, values in zip(MEMORY_GRID_KEYS, (kinds, memory_sizes, thresholds), strict=True)
        if values
    }
    return grid | dict(extra or {})


def acting_threshold_space(
    base: ExperimentConfig,
    kinds: Sequence[str] = (),
    memory_sizes: Sequence[int] = (),
    acting: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A grid over whole memory configs: each kind (default: the base's) x memory size (default:
    the base's) x threshold 0 and `acting` thresholds inside that kind's `threshold_range`, where
    its threshold changes something (a share kind and a decay kind act at different values, so
    one threshold axis shared by all kinds would leave some idle). Plus `extra` dimensions."""
    memory = base.model.memory
    points = []
    for kind in kinds or (memory.kind,):
        for size in memory_sizes or (memory.memory_size,):
            for threshold in (0.0, *REGISTRY[kind].acting_thresholds(acting)):
                # Setting the kind resets its own fields, so it is set only where it changes.
                point = {} if kind == memory.kind else {"model.memory.kind": kind}
                point |= {"model.memory.memory_size": size}
                point["model.memory.forget_threshold"] = threshold
                points.append(apply_overrides(base, point).model.memory.model_dump(mode="json"))
    return {"model.memory": {"grid": points}} | dict(extra or {})


def planned_trials(raw: dict[str, Any], num_samples: int = 1) -> int | None:
    """Trials a grid (repeated `num_samples` times) will run; None if the space does not parse."""
    try:
        space = {key: Dimension.model_validate(value) for key, value in raw.items()}
    except ValueError:
        return None
    return grid_size(space) * num_samples
