"""GRU as a memory layer: the hidden state is the memory (Cho et al., 2014)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from memory_models.common import zero_below
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.state import MemoryState


@dataclasses.dataclass
class GRUState(MemoryState):
    hidden: Tensor  # [B, H]

    def live_entries(self) -> Tensor:
        # Every hidden unit is a memory entry that is always in use.
        return self._always_live(self.hidden.shape[1])


class GRUConfig(MemoryConfig):
    """`memory_size` is the hidden size H.

    `forget_threshold`: the update gate z is the share of the old state a unit keeps
    (h' = z * h + (1 - z) * n); values of z under the threshold are snapped to 0, so the unit
    replaces its memory outright. 0 gives the textbook GRU.
    """

    shape_bound = frozenset({"memory_size"})  # the hidden size sizes every weight

    kind: Literal["gru"] = "gru"
    threshold_range = (0.02, 0.5)  # update-gate values
    memory_size: int = Field(default=64, ge=1)

    def build(self, d_model: int) -> GRULayer:
        return GRULayer(self, d_model)


class GRULayer(MemoryLayer):
    """GRU memory layer (Cho et al., 2014).

    Fast path: torch's fused `nn.GRU` (cuDNN on GPU) when `forget_threshold == 0`; otherwise a time
    loop over the same weights with the input projection hoisted out of the loop.
    """

    state_type = GRUState
    config: GRUConfig

    def __init__(self, config: GRUConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.rnn = nn.GRU(d_model, config.memory_size, batch_first=True)
        self.out = nn.Linear(config.memory_size, d_model)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> GRUState:
        hidden = torch.zeros(batch_size, self.config.memory_size, device=device, dtype=dtype)
        return GRUState(hidden=hidden)

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return self.config.memory_size * torch.finfo(dtype).bits // 8

    def forward(self, x: Tensor, state: GRUState | None = None) -> tuple[Tensor, GRUState]:
        state = self._state_or_init(x, state)
        if self.config.forget_threshold == 0.0:
            hidden_seq, h = self.rnn(x, state.hidden[None])
            return self.out(hidden_seq), GRUState(hidden=h[0])
        return self._thresholded_loop(x, state)

    def _thresholded_loop(self, x: Tensor, state: GRUState) -> tuple[Tensor, GRUState]:
        projected = x @ self.rnn.weight_ih_l0.T + self.rnn.bias_ih_l0  # [B, T, 3H]
        h = state.hidden
        outputs = []
        for t in range(x.shape[1]):
            recurrent = h @ self.rnn.weight_hh_l0.T + self.rnn.bias_hh_l0  # [B, 3H]
            h = self._apply_gates(projected[:, t], recurrent, h)
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1)), GRUState(hidden=h)

    def _apply_gates(self, from_input: Tensor, from_hidden: Tensor, hidden: Tensor) -> Tensor:
        in_r, in_z, in_n = from_input.chunk(3, dim=-1)  # torch's r, z, n
        hid_r, hid_z, hid_n = from_hidden.chunk(3, dim=-1)
        reset = torch.sigmoid(in_r + hid_r)
        keep = zero_below(torch.sigmoid(in_z + hid_z), self.config.forget_threshold)
        candidate = torch.tanh(in_n + reset * hid_n)
        return keep * hidden + (1 - keep) * candidate

    def reference_forward(
        self, x: Tensor, state: GRUState | None = None
    ) -> tuple[Tensor, GRUState]:
        """One textbook GRU cell per step, each gate from its own slice of the weights."""
        state = self._state_or_init(x, state)
        size = self.config.memory_size
        w_ih, w_hh = self.rnn.weight_ih_l0, self.rnn.weight_hh_l0
        b_ih, b_hh = self.rnn.bias_ih_l0, self.rnn.bias_hh_l0

        def part(index: int, x_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
            rows = slice(index * size, (index + 1) * size)
            return x_t @ w_ih[rows].T + b_ih[rows], h @ w_hh[rows].T + b_hh[rows]

        h = state.hidden
        outputs = []
        for t in range(x.shape[1]):
            x_t = x[:, t]
            r = torch.sigmoid(sum(part(0, x_t, h)))
            z = zero_below(torch.sigmoid(sum(part(1, x_t, h))), self.config.forget_threshold)
            n_in, n_hid = part(2, x_t, h)
            n = torch.tanh(n_in + r * n_hid)
            h = z * h + (1 - z) * n
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1)), GRUState(hidden=h)
