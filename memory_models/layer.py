"""The one stateful interface every memory mechanism implements.

A memory layer maps `x: [B, T, D]` and an optional state to `(y: [B, T, D], new_state)`. What a
layer outputs for a stream does not depend on how the stream is cut into calls, at every forget
threshold: memory decisions are made per token (eviction by attention share) or at segment
boundaries aligned to absolute positions (segment recurrence), never at call ends, so whole-row
training and scoring see exactly the memory a served session has. Training
carries the state across segments (truncated backprop), tuning sweeps `memory_size` and
`forget_threshold`, serving keeps one state per client session; all three rely on this contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from memory_models.state import MemoryState


class MemoryConfig(BaseModel):
    """Fields every mechanism takes. Subclasses fix `kind` with a `Literal` and add their own.

    `memory_size` and `forget_threshold` mean something different for each mechanism; each
    subclass's docstring says what (and the README's mechanism table collects them).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Settings whose value fixes a parameter's shape (an LSTM's hidden size). The others can
    #: change between steps of one run with the same weights: a capacity controller or
    #: population-based tuning may move only those.
    shape_bound: ClassVar[frozenset[str]] = frozenset()
    #: False for a mechanism with nothing to forget; its `forget_threshold` must stay 0.
    forgets: ClassVar[bool] = True
    #: Where `forget_threshold` changes something: the values the kind's decision statistic
    #: (a share, a decay, a gate) takes, so that thresholds outside it are idle. Checked at
    #: initialisation (`tests/test_contract.py`: the midpoint changes the outputs); training moves
    #: the statistics (the CPU report found GLA's learned decays at 0.8 to 0.99).
    threshold_range: ClassVar[tuple[float, float] | None] = None

    kind: str
    memory_size: int | None = Field(default=32, ge=1)
    forget_threshold: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _threshold_needs_something_to_forget(self) -> MemoryConfig:
        reason = self._nothing_to_forget() if self.forget_threshold != 0.0 else None
        if reason is not None:
            raise ValueError(reason)
        return self

    def _nothing_to_forget(self) -> str | None:
        """Why a forget threshold would forget nothing with these settings (it is then refused,
        with this as the error), or None. Mechanisms with a setting that turns forgetting off
        extend it."""
        if self.forgets:
            return None
        return (
            f"forget_threshold={self.forget_threshold}: kind {self.kind!r} has no decay or "
            "eviction, so there is nothing to forget; leave forget_threshold at 0"
        )

    @classmethod
    def acting_thresholds(cls, count: int = 2) -> tuple[float, ...]:
        """`count` thresholds spread evenly inside `threshold_range` (ends excluded), for a
        sweep or a test that wants the threshold to do something; () if nothing is forgotten."""
        if cls.threshold_range is None:
            return ()
        low, high = cls.threshold_range
        step = (high - low) / (count + 1)
        return tuple(round(low + step * i, 6) for i in range(1, count + 1))

    @classmethod
    def movable_settings(cls) -> frozenset[str]:
        """The shared settings that may change mid-run without touching parameter shapes."""
        return frozenset({"memory_size", "forget_threshold"}) - cls.shape_bound

    def build(self, d_model: int) -> MemoryLayer:
        """The layer this config describes, for inputs of width `d_model`."""
        raise NotImplementedError(f"{type(self).__name__} must define build()")


class MemoryLayer(nn.Module, ABC):
    """Base class of all memory layers (see the module docstring for the contract)."""

    config: MemoryConfig
    #: The state type this layer produces; the contract tests use it.
    state_type: ClassVar[type[MemoryState]]

    def __init__(self, config: MemoryConfig, d_model: int) -> None:
        super().__init__()
        self.config = config
        self.d_model = d_model

    @abstractmethod
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MemoryState:
        """The empty memory for `batch_size` new sequences."""

    @abstractmethod
    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Fast path. `x: [B, T, D]`; `state=None` means `init_state`."""

    @abstractmethod
    def reference_forward(
        self, x: Tensor, state: MemoryState | None = None
    ) -> tuple[Tensor, MemoryState]:
        """Slow, obviously correct per-timestep path with the same weights and semantics."""

    @abstractmethod
    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state held per sequence after `seq_len` tokens (equals the state's tensors)."""

    def reconfigure(self, **settings: Any) -> None:
        """Change shape-free settings in place (a capacity controller, population-based
        tuning): the weights stay, the next call runs with the new values, and a state kept from
        before is brought within the new bound by that call's own eviction. A setting that sizes
        a weight (`shape_bound`) is refused, naming the kind."""
        fixed = sorted(set(settings) - self.config.movable_settings())
        if fixed:
            raise ValueError(
                f"kind {self.config.kind!r} cannot change {', '.join(fixed)} during a run "
                f"(it sizes the weights, or is not a memory setting); movable: "
                f"{', '.join(sorted(self.config.movable_settings())) or 'none'}"
            )
        self.config = type(self.config).model_validate(self.config.model_dump() | settings)

    def auxiliary_loss(self) -> Tensor | None:
        """An extra training loss from the last forward (e.g. compressive reconstruction)."""
        return None

    def _state_or_init(self, x: Tensor, state: MemoryState | None) -> MemoryState:
        if state is None:
            return self.init_state(x.shape[0], x.device, x.dtype)
        if state.batch_size != x.shape[0]:
            raise ValueError(
                f"state holds {state.batch_size} sequences but x has batch {x.shape[0]}; "
                "stack or split states to match the batch"
            )
        return state
