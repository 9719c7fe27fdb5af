"""DeltaNet: a matrix memory per head, written by the delta rule and optionally gated."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.common import merge_heads, require_heads_divide, split_heads
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.short_conv import ShortConvolution
from memory_models.state import MemoryState


@dataclasses.dataclass
class DeltaNetState(MemoryState):
    memory: Tensor  # [B, H, Dk, Dv]: each head's fast-weight matrix S
    # [B, K-1, C]: the last K-1 projections before the short convolution (K = conv_size), zeros
    # at the start (the causal padding of the first tokens); no rows without a convolution.
    conv: Tensor

    def live_entries(self) -> Tensor:
        # S stores at most Dk independent associations per head (its rank); all Dk are in use.
        return self._always_live(self.memory.shape[2])


class DeltaNetConfig(MemoryConfig):
    """`memory_size` is Dk, the key dimension of each head: every head holds a `[Dk, Dv]` matrix
    with `Dv = d_model / n_heads`, so the state is `n_heads * Dk * Dv = memory_size * d_model`
    numbers per sequence whatever the sequence length (plus `(conv_size - 1) * (2 * n_heads * Dk
    + d_model)` with the short convolution).

    `forget_threshold` (gated only): decay gate values `a_t` under it snap to 0, a full reset of
    the head's memory at that step (`S_t = beta_t k_t v_t^T`), as an LSTM forget gate under it
    forgets completely. 0 keeps every gate as computed. With `gated=False` (`a_t = 1`, plain
    DeltaNet) an association lasts until it is overwritten, there is nothing to forget, and a
    threshold is refused.

    `chunk_size` only splits the fast path's work (outputs do not depend on it); `conv_size` adds
    the papers' short causal depthwise convolution on q, k and v (`None`: no convolution).
    """

    shape_bound = frozenset({"memory_size"})  # Dk sizes the query and key projections

    kind: Literal["deltanet"] = "deltanet"
    threshold_range = (0.2, 0.95)  # the gate values
    memory_size: int = Field(default=16, ge=1)
    n_heads: int = Field(default=4, ge=1)
    gated: bool = True
    chunk_size: int = Field(default=64, ge=1)
    conv_size: int | None = Field(default=None, ge=2)

    def _nothing_to_forget(self) -> str | None:
        if not self.gated:
            return (
                f"forget_threshold={self.forget_threshold}: with gated=False DeltaNet has no decay "
                "gate (a_t = 1), so there is nothing to forget; set gated=True or leave "
                "forget_threshold at 0"
            )
        return super()._nothing_to_forget()

    def build(self, d_model: int) -> DeltaNetLayer:
        require_heads_divide(self.n_heads, d_model, "each head's value width is d_model / n_heads")
        return DeltaNetLayer(self, d_model)


class DeltaInputs(NamedTuple):
    """What the delta rule reads at each step of one call, per head."""

    q: Tensor  # [B, H, T, Dk], unit norm
    k: Tensor  # [B, H, T, Dk], unit norm
    v: Tensor  # [B, H, T, Dv]
    beta: Tensor  # [B, H, T]: write strength in (0, 1)
    log_decay: Tensor  # [B, H, T]: log a_t <= 0 (0 without a gate)
    reset: Tensor  # [B, H, T] bool: a_t snapped to 0 by the forget threshold


def delta_rule_recurrent(inputs: DeltaInputs, memory: Tensor) -> tuple[Tensor, Tensor]:
    """The gated delta rule of Yang et al. (2025), one step at a time, as written:

    `S_t = a_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T`, `o_t = S_t^T q_t`.

    `memory: [B, H, Dk, Dv]` -> reads `[B, H, T, Dv]` and the memory after the last step.
    """
    decay = torch.where(inputs.reset, 0.0, inputs.log_decay.exp())  # [B, H, T]
    reads = []
    for t in range(inputs.q.shape[2]):
        q, k, v = inputs.q[:, :, t], inputs.k[:, :, t], inputs.v[:, :, t]  # [B, H, Dk or Dv]
        a, beta = decay[:, :, t, None, None], inputs.beta[:, :, t, None, None]
        k_column, v_row = k[..., :, None], v[..., None, :]  # [B, H, Dk, 1], [B, H, 1, Dv]
        recalled = k[..., None, :] @ memory  # [B, H, 1, Dv]: what S holds for k now
        memory = a * (memory - beta * k_column * recalled) + beta * k_column * v_row
        reads.append((q[..., None, :] @ memory)[..., 0, :])
    return torch.stack(reads, dim=2), memory


def delta_rule_chunkwise(
    inputs: DeltaInputs, memory: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The same rule, chunkwise parallel through the WY representation (Yang et al., 2024, sec. 3),
    with the gate's decays entering as in Yang et al. (2025). Same arguments and results as
    `delta_rule_recurrent`.

    Within a chunk starting from `S_0`, `S_r = g_r S_0 + sum_{i<=r} G_ri k_i d_i^T`, where `g_r`
    is the product of the chunk's gates up to r and `G_ri = g_r / g_i`. The corrections `d_i`
    solve the unit lower-triangular system
    `(I + tril(diag(beta) (K K^T * G), -1)) D = diag(beta) (V - diag(g) K S_0)`, i.e.
    `D = U - W S_0` with `U, W` independent of `S_0`: every chunk solves at once, and only the
    small hand-over of `S_0` runs in a loop over chunks. Zero padding to whole chunks adds no-op
    steps (k = v = 0, beta = 0, a = 1).
    """
    steps = inputs.q.shape[2]
    q, k, v, beta, log_decay, reset = (_in_chunks(t, chunk_size) for t in inputs)
    within, from_start = _chunk_decays(log_decay, reset)
    u, w = _wy_representation(k, v, beta, within, from_start)
    scores = (q @ k.transpose(-1, -2)) * within  # [B, H, N, C, C]
    q_from_start = q * from_start[..., None]  # reads of S_0 decay like S_0
    k_to_end = k * within[..., -1, :, None]  # writes decay to the chunk's end
    decay_to_end = from_start[..., -1, None, None]  # [B, H, N, 1, 1]
    reads = []
    for n in range(q.shape[2]):
        corrections = u[:, :, n] - w[:, :, n] @ memory  # [B, H, C, Dv]
        reads.append(q_from_start[:, :, n] @ memory + scores[:, :, n] @ corrections)
        memory = decay_to_end[:, :, n] * memory + k_to_end[:, :, n].transpose(-1, -2) @ corrections
    return torch.cat(reads, dim=2)[:, :, :steps], memory


def _in_chunks(t: Tensor, chunk_size: int) -> Tensor:
    """`[B, H, T, ...]` zero-padded to whole chunks -> `[B, H, N, C, ...]`."""
    batch, heads, steps = t.shape[:3]
    missing = -steps % chunk_size
    padding = t.new_zeros(batch, heads, missing, *t.shape[3:])
    return torch.cat([t, padding], dim=2).unflatten(2, (-1, chunk_size))


def _chunk_decays(log_decay: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
    """Gate products inside each chunk, in log space so that long chunks cannot underflow into
    0 / 0: `within[r, i] = a_{i+1} ... a_r` (i <= r, else 0), `from_start[r] = a_1 ... a_r`.

    A snapped gate (`reset`) cuts the products through it to exactly 0; it is tracked by counting
    resets rather than by log 0, whose differences would be NaN.
    """
    log_decay = log_decay.masked_fill(reset, 0.0)
    cumulative = log_decay.cumsum(-1)  # [B, H, N, C]
    resets = reset.long().cumsum(-1)
    size = cumulative.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=reset.device).tril()
    connected = causal & (resets[..., :, None] == resets[..., None, :])  # [B, H, N, C, C]
    gap = cumulative[..., :, None] - cumulative[..., None, :]
    within = gap.masked_fill(~connected, -math.inf).exp()
    from_start = cumulative.masked_fill(resets > 0, -math.inf).exp()
    return within, from_start


def _wy_representation(
    k: Tensor, v: Tensor, beta: Tensor, within: Tensor, from_start: Tensor
) -> tuple[Tensor, Tensor]:
    """`U = T V`, `W = T diag(g) K` with `T = (I + tril(diag(beta) (K K^T * G), -1))^-1 diag(beta)`,
    by one forward substitution for both. Shapes `[B, H, N, C, Dv]` and `[B, H, N, C, Dk]`."""
    interaction = beta[..., None] * (k @ k.transpose(-1, -2)) * within  # [B, H, N, C, C]
    targets = torch.cat([beta[..., None] * v, (beta * from_start)[..., None] * k], dim=-1)
    # `within` is 0 above the diagonal, and `unitriangular` reads the diagonal as 1: the solver
    # sees exactly I + tril(interaction, -1) without building it.
    solved = torch.linalg.solve_triangular(interaction, targets, upper=False, unitriangular=True)
    return solved.split([v.shape[-1], k.shape[-1]], dim=-1)


class DeltaNetLayer(MemoryLayer):
    """DeltaNet (Schlag et al., 2021, "Linear Transformers Are Secretly Fast Weight Programmers";
    Yang et al., 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length") and Gated DeltaNet (Yang et al., 2025, "Gated Delta Networks").

    Each head keeps a fast-weight matrix `S: [Dk, Dv]` and, per token, first forgets
    (`S <- a_t S`), then overwrites the association of key `k_t`: it removes the `beta_t` share of
    what `S` returns for `k_t` and writes `beta_t v_t` in its place, so writing k -> v1 and then
    k -> v2 with `beta = 1` leaves k -> v2 (linear attention would return v1 + v2). It reads
    `o_t = S_t^T q_t`. As in the papers: `q, k, v = SiLU(W x)` (after the optional short
    convolution), `q, k` L2-normalised per head, `beta_t = sigmoid(W_beta x)`, and Mamba-2's gate
    `a_t = exp(-exp(A_log) softplus(W_a x + b_a))` per head (`gated=False`: `a_t = 1`).

    Fast path: `delta_rule_chunkwise` (WY representation, matmuls per chunk, memory linear in T);
    reference: `delta_rule_recurrent` and a per-step convolution, with the same weights. The
    state carries everything, so any split of a sequence into calls equals the full pass.
    """

    state_type = DeltaNetState
    config: DeltaNetConfig

    def __init__(self, config: DeltaNetConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.n_heads = config.n_heads
        self.key_dim = config.memory_size
        self.value_dim = d_model // config.n_heads
        self.width = 2 * self.n_heads * self.key_dim + d_model  # q, k and v side by side
        self.qkv = nn.Linear(d_model, self.width, bias=False)
        self.short_conv = ShortConvolution(self.width, config.conv_size)
        self.write_strength = nn.Linear(d_model, self.n_heads)
        if config.gated:
            self.decay = nn.Linear(d_model, self.n_heads)
            self.decay_rate_log = nn.Parameter(torch.empty(self.n_heads))
            self._init_decay()
        self.out = nn.Linear(d_model, d_model)

    def _init_decay(self) -> None:
        """Mamba-2's start, as Gated DeltaNet's: rates `A ~ U(1, 16)`, step sizes
        `softplus(b_a)` log-uniform in [1e-3, 1e-1], so gates start between ~0.2 and ~1."""
        with torch.no_grad():
            self.decay_rate_log.copy_(torch.empty(self.n_heads).uniform_(1.0, 16.0).log())
            low, high = math.log(1e-3), math.log(1e-1)
            step = torch.empty(self.n_heads).uniform_(low, high).exp()
            self.decay.bias.copy_(step + torch.log(-torch.expm1(-step)))  # softplus^-1(step)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> DeltaNetState:
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return DeltaNetState(
            memory=torch.zeros(shape, device=device, dtype=dtype),
            conv=self.short_conv.empty_history(batch_size, device, dtype),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        numbers = self.n_heads * self.key_dim * self.value_dim + self.short_conv.history_numbers()
        return numbers * torch.finfo(dtype).bits // 8

    def forward(
        self, x: Tensor, state: DeltaNetState | None = None
    ) -> tuple[Tensor, DeltaNetState]:
        """`x: [B, T, D]` -> `y: [B, T, D]` through the chunkwise-parallel delta rule."""
        state = self._state_or_init(x, state)
        inputs, conv = self._project(x, state, self.short_conv)
        reads, memory = delta_rule_chunkwise(inputs, state.memory, self.config.chunk_size)
        return self._merge_heads(reads), DeltaNetState(memory=memory, conv=conv)

    def reference_forward(
        self, x: Tensor, state: DeltaNetState | None = None
    ) -> tuple[Tensor, DeltaNetState]:
        """One token at a time: the convolution window, then the recurrence as written."""
        state = self._state_or_init(x, state)
        inputs, conv = self._project(x, state, self.short_conv.stepwise)
        reads, memory = delta_rule_recurrent(inputs, state.memory)
        return self._merge_heads(reads), DeltaNetState(memory=memory, conv=conv)

    def _project(self, x: Tensor, state: DeltaNetState, convolve) -> tuple[DeltaInputs, Tensor]:
        """The delta rule's inputs for `x: [B, T, D]`, and the convolution history after it."""
        mixed, history = convolve(self.qkv(x), state.conv)  # [B, T, width]
        key_width = self.n_heads * self.key_dim
        q, k, v = F.silu(mixed).split([key_width, key_width, self.d_model], dim=-1)
        beta = torch.sigmoid(self.write_strength(x)).transpose(1, 2)  # [B, H, T]
        log_decay, reset = self._decays(x)
        inputs = DeltaInputs(
            q=F.normalize(split_heads(q, self.n_heads), dim=-1, eps=1e-6),
            k=F.normalize(split_heads(k, self.n_heads), dim=-1, eps=1e-6),
            v=split_heads(v, self.n_heads),
            beta=beta,
            log_decay=log_decay,
            reset=reset,
        )
        return inputs, history

    def _decays(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`log a_t: [B, H, T]` and where the forget threshold snaps `a_t` to 0."""
        if not self.config.gated:
            log_decay = x.new_zeros(x.shape[0], self.n_heads, x.shape[1])
            return log_decay, torch.zeros_like(log_decay, dtype=torch.bool)
        rate = self.decay_rate_log.exp()[:, None]  # [H, 1]
        log_decay = -rate * F.softplus(self.decay(x)).transpose(1, 2)  # [B, H, T]
        return log_decay, log_decay.exp() < self.config.forget_threshold

    def _merge_heads(self, reads: Tensor) -> Tensor:
        return self.out(merge_heads(reads))  # [B, H, T, Dv] -> [B, T, D]
