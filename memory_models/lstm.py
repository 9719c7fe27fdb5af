"""LSTM as a memory layer: the gated cell state is the memory (Hochreiter & Schmidhuber, 1997)."""

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
class LSTMState(MemoryState):
    hidden: Tensor  # [B, H]
    cell: Tensor  # [B, H]

    def live_entries(self) -> Tensor:
        # Every hidden unit is a memory entry that is always in use.
        return self._always_live(self.cell.shape[1])


class LSTMConfig(MemoryConfig):
    """`memory_size` is the hidden size H (the cell state holds H numbers per sequence).

    `forget_threshold`: forget-gate values under it are snapped to 0, so the unit forgets its cell
    completely instead of leaking a sliver of stale memory. 0 gives the textbook LSTM.
    """

    shape_bound = frozenset({"memory_size"})  # the hidden size sizes every weight

    kind: Literal["lstm"] = "lstm"
    threshold_range = (0.02, 0.5)  # forget-gate values
    memory_size: int = Field(default=64, ge=1)

    def build(self, d_model: int) -> LSTMLayer:
        return LSTMLayer(self, d_model)


class LSTMLayer(MemoryLayer):
    """LSTM memory layer (Hochreiter & Schmidhuber, 1997; forget gate: Gers et al., 2000).

    Fast path: torch's fused `nn.LSTM` (cuDNN on GPU) when `forget_threshold == 0`; otherwise a
    time loop over the same weights with the input projection hoisted out of the loop, because the
    snapped forget gate is not something the fused kernel can express.
    """

    state_type = LSTMState
    config: LSTMConfig

    def __init__(self, config: LSTMConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.rnn = nn.LSTM(d_model, config.memory_size, batch_first=True)
        self.out = nn.Linear(config.memory_size, d_model)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> LSTMState:
        zeros = torch.zeros(batch_size, self.config.memory_size, device=device, dtype=dtype)
        return LSTMState(hidden=zeros, cell=zeros.clone())

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * self.config.memory_size * torch.finfo(dtype).bits // 8

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        state = self._state_or_init(x, state)
        if self.config.forget_threshold == 0.0:
            hidden_seq, (h, c) = self.rnn(x, (state.hidden[None], state.cell[None]))
            return self.out(hidden_seq), LSTMState(hidden=h[0], cell=c[0])
        return self._thresholded_loop(x, state)

    def _thresholded_loop(self, x: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        projected = x @ self.rnn.weight_ih_l0.T + self.rnn.bias_ih_l0  # [B, T, 4H]
        h, c = state.hidden, state.cell
        outputs = []
        for t in range(x.shape[1]):
            gates = projected[:, t] + h @ self.rnn.weight_hh_l0.T + self.rnn.bias_hh_l0
            h, c = self._apply_gates(gates, c)
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1)), LSTMState(hidden=h, cell=c)

    def _apply_gates(self, gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)  # torch's i, f, g, o
        forget = zero_below(torch.sigmoid(forget_gate), self.config.forget_threshold)
        cell = forget * cell + torch.sigmoid(in_gate) * torch.tanh(candidate)
        return torch.sigmoid(out_gate) * torch.tanh(cell), cell

    def reference_forward(
        self, x: Tensor, state: LSTMState | None = None
    ) -> tuple[Tensor, LSTMState]:
        """One textbook LSTM cell per step, each gate from its own slice of the weights."""
        state = self._state_or_init(x, state)
        hidden = self.config.memory_size
        w_ih, w_hh = self.rnn.weight_ih_l0, self.rnn.weight_hh_l0
        b = self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0

        def gate(index: int, x_t: Tensor, h: Tensor) -> Tensor:
            rows = slice(index * hidden, (index + 1) * hidden)
            return x_t @ w_ih[rows].T + h @ w_hh[rows].T + b[rows]

        h, c = state.hidden, state.cell
        outputs = []
        for t in range(x.shape[1]):
            x_t = x[:, t]
            i = torch.sigmoid(gate(0, x_t, h))
            f = zero_below(torch.sigmoid(gate(1, x_t, h)), self.config.forget_threshold)
            g = torch.tanh(gate(2, x_t, h))
            o = torch.sigmoid(gate(3, x_t, h))
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1)), LSTMState(hidden=h, cell=c)
