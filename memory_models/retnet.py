"""Multi-scale retention: linear attention whose state decays at a fixed rate per head (Sun et al.,
2023, "Retentive Network")."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from memory_models.common import require_heads_divide
from memory_models.layer import MemoryConfig
from memory_models.matrix_memory import GatedRetentionLayer
from memory_models.state import MemoryState


@dataclasses.dataclass
class RetNetState(MemoryState):
    memory: Tensor  # [B, H, Dk, Dv]: S = sum of gamma^(age) k v^T
    # [B, K-1, C]: the short convolution's last K-1 inputs (`memory_models.short_conv`); no rows
    # without a convolution.
    conv: Tensor

    def live_entries(self) -> Tensor:
        # Each head holds one value direction per key dimension: Dk entries, always in use.
        return self._always_live(self.memory.shape[2])


class RetNetConfig(MemoryConfig):
    """`memory_size` is d_k, the key dimension per head; the state is `n_heads` matrices
    `[d_k, d_model / n_heads]`, whatever the sequence length.

    `forget_threshold`: a head whose decay gamma_h = 1 - 2^(-5-h) is under it has its decay
    snapped to 0, so that head keeps only the current token (S_t = k_t v_t^T). The gammas are
    0.96875, 0.984375, ... (rising with h), so thresholds up to 0.96875 change nothing; 0.99 cuts
    the first two heads. `chunk_size`: tokens per chunk of the fast path; it changes speed, never
    results (16 was fastest on CPU at d_model 128).
    `conv_size`: taps of the short causal convolution on q, k and v (`memory_models.short_conv`;
    `None`: none); it adds `(conv_size - 1) * (2 * n_heads * d_k + d_model)` numbers of state.
    """

    shape_bound = frozenset({"memory_size"})  # d_k sizes the query and key projections

    kind: Literal["retnet"] = "retnet"
    threshold_range = (0.97, 0.999)  # the heads' fixed decays gamma (all at least 0.96875)
    memory_size: int = Field(default=16, ge=1)
    n_heads: int = Field(default=4, ge=1)
    chunk_size: int = Field(default=16, ge=1)
    conv_size: int | None = Field(default=None, ge=2)

    def build(self, d_model: int) -> RetNetLayer:
        require_heads_divide(self.n_heads, d_model)
        return RetNetLayer(self, d_model)


def retention_decays(n_heads: int) -> Tensor:
    """`[H]` float64: gamma_h = 1 - 2^(-5-h), the multi-scale decays (Sun et al., 2023, eq. 8)."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))


class RetNetLayer(GatedRetentionLayer):
    """Multi-scale retention (Sun et al., 2023): per head h, retention with decay gamma_h,

        S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t          (eq. 6; eq. 5 in parallel)

    with `q` scaled by d_k^(-1/2); then, as in MSR (eq. 8), a per-head GroupNorm of the outputs and
    a swish gate: y = (swish(x W_G) * GroupNorm_h(o)) W_O.

    Kept from the paper: the multi-scale gammas, the d_k^(-1/2) scale, GroupNorm per head and the
    swish gate. Left out: the xPos rotation of q and k (positions enter only through the decay, so
    no position counter is carried), and the retention-score normalisations of section 2.2 (the
    per-row rescalings of D are undone by the GroupNorm anyway). Fast path: the chunkwise form
    (eq. 7) of the shared kernel; reference: the recurrence one step at a time. Chunk invariant.
    """

    state_type = RetNetState
    config: RetNetConfig

    def __init__(self, config: RetNetConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.GroupNorm(self.n_heads, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _log_decay(self, x: Tensor) -> Tensor:
        """`[B, H, T, 1]`: log gamma_h at every step, before the forget threshold."""
        log_gamma = retention_decays(self.n_heads).log().to(device=x.device, dtype=x.dtype)
        return log_gamma[None, :, None, None].expand(x.shape[0], -1, x.shape[1], 1)

    def _gate(self, x: Tensor) -> Tensor:
        return self.gate(x)  # x W_G
