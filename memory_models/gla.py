"""Gated linear attention: linear attention whose state decays per key dimension at a rate read
from the input (Yang et al., 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training")."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.common import require_heads_divide, split_heads
from memory_models.layer import MemoryConfig
from memory_models.matrix_memory import GatedRetentionLayer
from memory_models.state import MemoryState

# tau in alpha_t = sigmoid(...)^(1/tau): the paper's 16 keeps most decays close to 1.
GATE_TEMPERATURE = 16.0


@dataclasses.dataclass
class GLAState(MemoryState):
    memory: Tensor  # [B, H, Dk, Dv]: S, each key row decayed by its own gate
    # [B, K-1, C]: the short convolution's last K-1 inputs (`memory_models.short_conv`); no rows
    # without a convolution.
    conv: Tensor

    def live_entries(self) -> Tensor:
        # Each head holds one value direction per key dimension: Dk entries, always in use.
        return self._always_live(self.memory.shape[2])


class GLAConfig(MemoryConfig):
    """`memory_size` is d_k, the key dimension per head; the state is `n_heads` matrices
    `[d_k, d_model / n_heads]`, whatever the sequence length.

    `forget_threshold`: a decay entry alpha_t[i] (one per head, key dimension and step) under it
    snaps to 0, so row i of that head's state is wiped at that step before k_t v_t^T is written.
    With tau = 16 the decays sit near 1 (alpha < t needs sigmoid(.) < t^16): useful thresholds
    are around 0.8 to 0.99. `gate_rank`: rank of the low-rank gate projection W1 W2.
    `chunk_size`: tokens per chunk of the fast path; it changes speed, never results (16 was
    fastest on CPU at d_model 128).
    `conv_size`: taps of the short causal convolution on q, k and v (`memory_models.short_conv`;
    `None`: none); it adds `(conv_size - 1) * (2 * n_heads * d_k + d_model)` numbers of state.
    """

    shape_bound = frozenset({"memory_size"})  # d_k sizes the query, key and gate projections

    kind: Literal["gla"] = "gla"
    threshold_range = (0.95, 0.99)  # the data-dependent decays, near 1
    memory_size: int = Field(default=16, ge=1)
    n_heads: int = Field(default=4, ge=1)
    chunk_size: int = Field(default=16, ge=1)
    gate_rank: int = Field(default=16, ge=1)
    conv_size: int | None = Field(default=None, ge=2)

    def build(self, d_model: int) -> GLALayer:
        require_heads_divide(self.n_heads, d_model)
        return GLALayer(self, d_model)


class GLALayer(GatedRetentionLayer):
    """Gated linear attention (Yang et al., 2024, section 4): per head,

        S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t,
        alpha_t = sigmoid(x_t W1 W2 + b)^(1/tau),  tau = 16, W1 W2 of rank `gate_rank`,

    with `q` scaled by d_k^(-1/2), and the GLA block's output: a per-head GroupNorm of o and a
    swish output gate, y = (swish(x W_r + b_r) * GroupNorm_h(o)) W_O (section 4.3).
    log alpha = logsigmoid(.) / tau is computed in log space, never through alpha itself.
    Fast path: the chunkwise form of the shared kernel (section 4); the paper's secondary
    chunking, which keeps `[c, c, d_k]` blocks of decay ratios in fast GPU memory, is replaced by
    exact halving levels that need only matmuls (see `chunked_linear`). Reference: the recurrence
    one step at a time. Chunk invariant.
    """

    state_type = GLAState
    config: GLAConfig

    def __init__(self, config: GLAConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.gate_down = nn.Linear(d_model, config.gate_rank, bias=False)  # W1
        self.gate_up = nn.Linear(config.gate_rank, self.n_heads * self.key_dim)  # W2 and b
        self.out_gate = nn.Linear(d_model, d_model)  # W_r and b_r
        self.norm = nn.GroupNorm(self.n_heads, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _log_decay(self, x: Tensor) -> Tensor:
        """`[B, H, T, Dk]`: log alpha_t before the forget threshold."""
        logits = self.gate_up(self.gate_down(x))  # [B, T, H * Dk]
        return split_heads(F.logsigmoid(logits) / GATE_TEMPERATURE, self.n_heads)

    def _gate(self, x: Tensor) -> Tensor:
        return self.out_gate(x)  # x W_r + b_r
