"""What linear attention, RetNet and GLA share as layers: per head a `[Dk, Dv]` matrix memory
run by the decayed linear attention of `chunked_linear`, chunkwise on the fast path and one step
at a time in the reference, after the optional short convolution (`memory_models.short_conv`);
for RetNet and GLA also the decay snapped by the forget threshold and the output block, a swish
gate on a per-head GroupNorm."""

from __future__ import annotations

import functools
from abc import abstractmethod

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.chunked_linear import (
    Attend,
    chunked_decayed_attention,
    recurrent_decayed_attention,
    snap_log_decay,
)
from memory_models.common import merge_heads, split_heads
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.short_conv import Convolve, ShortConvolution
from memory_models.state import MemoryState


class MatrixMemoryLayer(MemoryLayer):
    """Per head, queries and keys of width Dk = `memory_size` and values of width Dv = d_model /
    n_heads from bias-free projections (`query`, `key`, `value`), through a short causal
    convolution of `conv_size` taps when the config sets one (its last inputs are part of the
    state). Its config has `n_heads`, `chunk_size` and `conv_size`; subclasses say in `_attend`
    how the heads' inputs meet the memory."""

    def __init__(self, config: MemoryConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.n_heads = config.n_heads
        self.key_dim = config.memory_size
        self.value_dim = d_model // config.n_heads
        keys = self.n_heads * self.key_dim
        self.query = nn.Linear(d_model, keys, bias=False)
        self.key = nn.Linear(d_model, keys, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.short_conv = ShortConvolution(2 * keys + d_model, config.conv_size)

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, chunkwise parallel."""
        attend = functools.partial(chunked_decayed_attention, chunk_size=self.config.chunk_size)
        return self._attend(x, state, attend, self.short_conv)

    def reference_forward(
        self, x: Tensor, state: MemoryState | None = None
    ) -> tuple[Tensor, MemoryState]:
        """The convolution and the recurrence one step at a time."""
        return self._attend(x, state, recurrent_decayed_attention, self.short_conv.stepwise)

    def _project(self, x: Tensor, history: Tensor, convolve: Convolve) -> tuple[Tensor, ...]:
        """`q, k: [B, T, H * Dk]`, `v: [B, T, D]` and the convolution's history after `x`: with
        a convolution, `conv(x W)` in place of `x W` for all three."""
        if self.short_conv.size is None:
            return self.query(x), self.key(x), self.value(x), history
        projected = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        mixed, history = convolve(projected, history)
        keys = self.n_heads * self.key_dim
        return (*mixed.split([keys, keys, self.d_model], dim=-1), history)

    def _conv_bytes(self, dtype: torch.dtype) -> int:
        return self.short_conv.history_numbers() * torch.finfo(dtype).bits // 8

    def _memory_zeros(self, batch_size: int, device, dtype: torch.dtype) -> Tensor:
        """An empty memory, `[B, H, Dk, Dv]`."""
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return torch.zeros(shape, device=device, dtype=dtype)

    @abstractmethod
    def _attend(
        self, x: Tensor, state: MemoryState | None, attend: Attend, convolve: Convolve
    ) -> tuple[Tensor, MemoryState]:
        """`x: [B, T, D]` through `convolve` and `attend` (either form of each) from `state`."""


class GatedRetentionLayer(MatrixMemoryLayer):
    """RetNet and GLA: the memory and the convolution's history are the state (`state_type` has
    the fields `memory` and `conv`), `q` is scaled by Dk^(-1/2), the decay `_log_decay(x)` snaps
    to 0 under the forget threshold, and the output is `(swish(_gate(x)) * GroupNorm_h(o)) W_O`
    with the layer's `norm` and `out`."""

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> MemoryState:
        return self.state_type(
            memory=self._memory_zeros(batch_size, device, dtype),
            conv=self.short_conv.empty_history(batch_size, device, dtype),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        memory = self.n_heads * self.key_dim * self.value_dim * torch.finfo(dtype).bits // 8
        return memory + self._conv_bytes(dtype)

    @abstractmethod
    def _log_decay(self, x: Tensor) -> Tensor:
        """`[B, H, T, Dk or 1]`: the log decays before the forget threshold."""

    @abstractmethod
    def _gate(self, x: Tensor) -> Tensor:
        """`[B, T, D]`: the output gate's pre-activation."""

    def _attend(
        self, x: Tensor, state: MemoryState | None, attend: Attend, convolve: Convolve
    ) -> tuple[Tensor, MemoryState]:
        state = self._state_or_init(x, state)
        q, k, v, history = self._project(x, state.conv, convolve)
        q = split_heads(q, self.n_heads) * self.key_dim**-0.5  # [B, H, T, Dk]
        k = split_heads(k, self.n_heads)
        v = split_heads(v, self.n_heads)  # [B, H, T, Dv]
        log_decay = snap_log_decay(self._log_decay(x), self.config.forget_threshold)
        read, memory = attend(q, k, v, log_decay, state.memory)  # [B, H, T, Dv]
        return self._output(x, merge_heads(read)), self.state_type(memory=memory, conv=history)

    def _output(self, x: Tensor, read: Tensor) -> Tensor:
        """`(swish(_gate(x)) * GroupNorm_h(read)) W_O`; `read: [B, T, D]`, normalised per token."""
        normed = self.norm(read.flatten(0, 1)).view_as(read)
        return self.out(F.silu(self._gate(x)) * normed)
