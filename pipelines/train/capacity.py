"""A capacity controller: one run finds the smallest memory that holds its validation loss.

Only a shape-free `memory_size` can move during a run (an attention window, a slot count: the
weights stay, `MemoryLayer.reconfigure` changes the bound). The controller starts at the config's
size and, at each validation evaluation:

- grows (x `growth`, up to `max_memory_size`) once the loss has not improved by more than
  `tolerance` for `patience` evaluations: the memory, not the optimiser, is what stalls it;
- every `probe_every` evaluations, while the loss is improving, is shown the loss of the same
  weights at a smaller size (/ `growth`, down to `min_memory_size`) and shrinks there when it
  costs less than `tolerance` (`CapacityController` says why only then).

Decisions are plain Python over the losses it is handed, so tests drive it without Ray or a model;
the Ray worker (`pipelines.train.worker`) runs the evaluations on rank 0 and sends the new size to
every rank. Its state is a dict of plain values, stored in each checkpoint's `Position`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memory_models.registry import REGISTRY


class CapacitySettings(BaseModel):
    """`train.capacity`. The defaults suit the small synthetic tasks evaluated a few times an
    epoch: patience 2 tolerates one noisy evaluation before growing; doubling (and halving) moves
    between sizes a grid sweep would also try; probing every 3 evaluations keeps the extra
    evaluation below a third of the evaluation cost; a tolerance of 0.02 nats is a little above
    the noise of a 64-row validation set's mean loss."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["fixed", "loss"] = "fixed"
    patience: int = Field(default=2, ge=1, description="evaluations without improvement")
    growth: int = Field(default=2, ge=2, description="factor to grow by (and probe smaller by)")
    max_memory_size: int = Field(default=256, ge=1)
    min_memory_size: int = Field(default=4, ge=1)
    probe_every: int = Field(default=3, ge=1, description="evaluations between shrink probes")
    tolerance: float = Field(
        default=0.02, ge=0, description="validation loss (nats) that counts as a change"
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="also evaluate every N steps (not only at epoch ends)"
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> CapacitySettings:
        if self.min_memory_size > self.max_memory_size:
            raise ValueError(
                f"train.capacity.min_memory_size={self.min_memory_size} is above "
                f"max_memory_size={self.max_memory_size}"
            )
        return self

    @property
    def active(self) -> bool:
        return self.policy != "fixed"


@dataclass(frozen=True)
class CapacityChange:
    """One decision, with the losses that justified it (an MLflow event)."""

    step: int
    old: int
    new: int
    reason: Literal["grow", "shrink"]
    loss: float
    probe_loss: float | None = None


@dataclass
class CapacityController:
    """The decisions of `policy="loss"` (module docstring): `decide` at every evaluation.

    Probes run only while the loss at the current size is still improving, and not after a
    growth until the loss has improved on the one that triggered it. On a plateau (MQAR before
    its recall circuit forms) every size does equally badly, so a probe there would shrink the
    memory the model is about to need; the loss falling says the memory is in use, and a smaller
    one that keeps up with it is enough.
    """

    settings: CapacitySettings
    memory_size: int
    best_loss: float = math.inf
    stale: int = 0  # evaluations since the loss last improved by more than the tolerance
    evaluations: int = 0
    grown_at_loss: float | None = None  # the loss that triggered the last growth, until beaten
    changes: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, settings: CapacitySettings, memory_size: int) -> CapacityController:
        """At the config's size, clamped into the bounds."""
        low, high = settings.min_memory_size, settings.max_memory_size
        return cls(settings, min(high, max(low, memory_size)))

    def decide(self, step: int, loss: float, loss_at: Callable[[int], float]) -> int | None:
        """`observe` the validation `loss` at the current size, probing a smaller size when one
        is due: `loss_at(size)` is the loss of the same weights at `size` (the caller moves the
        memory there and back)."""
        probe = self.probe_size(loss)
        return self.observe(step, loss, loss_at(probe) if probe is not None else None)

    def probe_size(self, loss: float) -> int | None:
        """The smaller size to evaluate beside `loss` (this evaluation's), or None."""
        due = (self.evaluations + 1) % self.settings.probe_every == 0
        if not due or not self._improves(loss) or self._on_probation(loss):
            return None
        smaller = max(self.settings.min_memory_size, self.memory_size // self.settings.growth)
        return smaller if smaller < self.memory_size else None

    def observe(self, step: int, loss: float, probe_loss: float | None = None) -> int | None:
        """The loss at the current size (and at `probe_size(loss)`, if probed); the new size if
        it changes. A shrink within tolerance wins over growing: a smaller memory that does as
        well says the memory is not what holds the loss up."""
        probed = self.probe_size(loss) if probe_loss is not None else None
        self.evaluations += 1
        if not self._on_probation(loss):
            self.grown_at_loss = None
        if self._improves(loss):
            self.best_loss, self.stale = loss, 0
        else:
            self.stale += 1
        if probed is not None and probe_loss - loss < self.settings.tolerance:
            return self._move(step, probed, "shrink", loss, probe_loss)
        grown = min(self.settings.max_memory_size, self.memory_size * self.settings.growth)
        if self.stale >= self.settings.patience and grown > self.memory_size:
            self._move(step, grown, "grow", loss, probe_loss)
            self.grown_at_loss = loss
            return grown
        return None

    def _improves(self, loss: float) -> bool:
        return loss < self.best_loss - self.settings.tolerance

    def _on_probation(self, loss: float) -> bool:
        return (
            self.grown_at_loss is not None and loss >= self.grown_at_loss - self.settings.tolerance
        )

    def _move(self, step: int, new: int, reason, loss: float, probe_loss: float | None) -> int:
        change = CapacityChange(step, self.memory_size, new, reason, loss, probe_loss)
        self.changes.append(asdict(change))
        self.memory_size = new
        # The new size is judged afresh: its first losses set the bar it must improve on.
        self.best_loss, self.stale = math.inf, 0
        return new

    def state(self) -> dict:
        """Plain values for the checkpoint (`torch.load(weights_only=True)` reads them)."""
        return {
            "memory_size": self.memory_size,
            "best_loss": self.best_loss,
            "stale": self.stale,
            "evaluations": self.evaluations,
            "grown_at_loss": self.grown_at_loss,
            "changes": list(self.changes),
        }

    @classmethod
    def from_state(cls, settings: CapacitySettings, state: dict) -> CapacityController:
        return cls(settings, **{**state, "changes": list(state["changes"])})


class ShapeBoundError(ValueError):
    """A request to move a setting that sizes the weights (an LSTM's hidden size)."""


def refuse_shape_bound(kind: str, setting: str, asked_by: str, fix: str) -> None:
    """Raise `ShapeBoundError` if `setting` of memory `kind` cannot move mid-run; say why and
    which kinds can. Called on configs, before any Ray work starts."""
    config_class = REGISTRY[kind]
    if setting in config_class.movable_settings():
        return
    movable = sorted(k for k, c in REGISTRY.items() if setting in c.movable_settings())
    raise ShapeBoundError(
        f"{asked_by} cannot move {setting} of kind {kind!r} during a run: it sizes the layer's "
        f"weights (shape-bound). {fix}; kinds whose {setting} moves: {', '.join(movable)}"
    )


def move_memory(model: torch.nn.Module, **settings: float) -> None:
    """Change shape-free memory settings of every block in place (the weights stay)."""
    for block in model.blocks:
        block.memory.reconfigure(**settings)


def set_base_lr(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float
) -> None:
    """A new peak learning rate under the same schedule: what a restored optimizer and scheduler
    remember (the donor's rate, for population-based training) is replaced, and the current rate
    becomes `lr` times the schedule's factor at this step."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
