"""Linear attention: softmax replaced by a feature map, so attention becomes an RNN with a matrix
state (Katharopoulos et al., 2020)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.chunked_linear import Attend
from memory_models.common import merge_heads, require_heads_divide, split_heads
from memory_models.layer import MemoryConfig
from memory_models.matrix_memory import MatrixMemoryLayer
from memory_models.short_conv import Convolve
from memory_models.state import MemoryState

# Keeps the division finite when phi(q)^T z is 0 (possible with relu features).
NORMALISER_EPS = 1e-6


@dataclasses.dataclass
class LinearAttentionState(MemoryState):
    memory: Tensor  # [B, H, Dk, Dv]: S = sum of phi(k) v^T
    normaliser: Tensor  # [B, H, Dk]: z = sum of phi(k)
    # [B, K-1, C]: the short convolution's last K-1 inputs (`memory_models.short_conv`); no rows
    # without a convolution.
    conv: Tensor

    def live_entries(self) -> Tensor:
        # Each head holds one value direction per key dimension: Dk entries, always in use.
        return self._always_live(self.memory.shape[2])


class LinearAttentionConfig(MemoryConfig):
    """`memory_size` is d_k, the feature (key) dimension per head; the state is `n_heads` matrices
    `[d_k, d_model / n_heads]` plus a normaliser `[d_k]` per head, whatever the sequence length.

    `forget_threshold` must stay 0: nothing decays, every token stays in the sums for good.
    `feature_map`: phi, `elu` (elu(x) + 1, the paper's) or `relu`. `chunk_size`: tokens per chunk
    of the chunkwise-parallel fast path; it changes speed, never results (in-chunk work per token
    grows with it, the sequential steps shrink; 16 was fastest on CPU at d_model 128).
    `conv_size`: taps of the short causal convolution on q, k and v (`memory_models.short_conv`;
    `None`: none); it adds `(conv_size - 1) * (2 * n_heads * d_k + d_model)` numbers of state.
    """

    shape_bound = frozenset({"memory_size"})  # d_k sizes the query and key projections
    forgets = False

    kind: Literal["linear_attention"] = "linear_attention"
    memory_size: int = Field(default=16, ge=1)
    n_heads: int = Field(default=4, ge=1)
    chunk_size: int = Field(default=16, ge=1)
    feature_map: Literal["elu", "relu"] = "elu"
    conv_size: int | None = Field(default=None, ge=2)

    def build(self, d_model: int) -> LinearAttentionLayer:
        require_heads_divide(self.n_heads, d_model)
        return LinearAttentionLayer(self, d_model)


class LinearAttentionLayer(MatrixMemoryLayer):
    """Causal linear attention (Katharopoulos et al., 2020, eq. 4-6; recurrent form eq. 18-20):

        S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t),
        o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),

    per head, then an output projection; with `conv_size`, q, k and v come through the short
    convolution first (phi applies after it). Both paths run the shared decayed-linear-attention
    recurrence without decay on values extended by a column of ones, whose column of the state is
    z and whose read is the denominator phi(q)^T z. Fast path: the chunkwise-parallel form;
    reference: the recurrence one step at a time. Chunk invariant.
    """

    state_type = LinearAttentionState
    config: LinearAttentionConfig

    def __init__(self, config: LinearAttentionConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.out = nn.Linear(d_model, d_model)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> LinearAttentionState:
        heads = (batch_size, self.n_heads, self.key_dim)
        return LinearAttentionState(
            memory=self._memory_zeros(batch_size, device, dtype),
            normaliser=torch.zeros(heads, device=device, dtype=dtype),
            conv=self.short_conv.empty_history(batch_size, device, dtype),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        per_head = self.key_dim * self.value_dim + self.key_dim  # S and z
        return self.n_heads * per_head * torch.finfo(dtype).bits // 8 + self._conv_bytes(dtype)

    def _phi(self, x: Tensor) -> Tensor:
        if self.config.feature_map == "elu":
            return F.elu(x) + 1.0
        return F.relu(x)

    def _attend(
        self, x: Tensor, state: LinearAttentionState | None, attend: Attend, convolve: Convolve
    ) -> tuple[Tensor, LinearAttentionState]:
        state = self._state_or_init(x, state)
        q, k, v, history = self._project(x, state.conv, convolve)
        q = split_heads(self._phi(q), self.n_heads)  # [B, H, T, Dk]
        k = split_heads(self._phi(k), self.n_heads)
        v = split_heads(v, self.n_heads)  # [B, H, T, Dv]
        with_ones = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, H, T, Dv+1]
        memory = torch.cat([state.memory, state.normaliser[..., None]], dim=-1)  # [S | z]
        read, memory = attend(q, k, with_ones, None, memory)  # [B, H, T, Dv+1]
        numerator, denominator = read[..., :-1], read[..., -1:]
        y = self.out(merge_heads(numerator / (denominator + NORMALISER_EPS)))
        memory, normaliser = memory[..., :-1], memory[..., -1]
        return y, LinearAttentionState(memory=memory, normaliser=normaliser, conv=history)
