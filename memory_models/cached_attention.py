"""What the layers attending over a cache of past keys and values share: heads and eviction by
attention share (attention, sparse, reformer, hierarchical, retrieval) and, for those with one
fused query-key-value projection (attention, sparse, retrieval), the projection and the
reference's loop over sequences."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from memory_models.common import chunk_positions, rotary
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.slot_cache import keep_by_share
from memory_models.state import MemoryState


class CachedAttentionLayer(MemoryLayer):
    """Attention with `n_heads` heads of width `d_model / n_heads` over a cache that drops
    entries by attention share.

    At `forget_threshold == 0` no share is judged: what the cache holds depends on positions
    only, and one call over a chunk (`_forward_call`) is the same as one call per token.
    Otherwise what stays depends on which queries a call had, so the decision is made per token,
    as TOVA and H2O make theirs per decoding step: `forward` runs `_forward_call` one token at a
    time. Either way a stream's outputs do not depend on how it is cut into calls, and whole-row
    training and scoring see exactly the memory a served session has. The reference
    (`_reference_call`, obviously correct per query) runs the same way. The share is a decision
    statistic, tracked only when the threshold reads it.
    """

    def __init__(self, config: MemoryConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads

    @property
    def _tracks_share(self) -> bool:
        return self.config.forget_threshold > 0.0

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`: one fused call, or one per token where eviction
        judges shares."""
        if self._tracks_share:
            return token_by_token(self._forward_call, x, state)
        return self._forward_call(x, state)

    def reference_forward(
        self, x: Tensor, state: MemoryState | None = None
    ) -> tuple[Tensor, MemoryState]:
        if self._tracks_share:
            return token_by_token(self._reference_call, x, state)
        return self._reference_call(x, state)

    @abstractmethod
    def _forward_call(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        """The fused path over one call's chunk, evicting at its end."""

    @abstractmethod
    def _reference_call(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        """The obviously correct path over one call's chunk, evicting at its end."""

    def _keep(self, valid: Tensor, share: Tensor) -> Tensor:
        """`[B, N]` bool: the entries that stay (candidates in age order), by `keep_by_share`
        with `memory_size` as the capacity."""
        return keep_by_share(valid, share, self.config.forget_threshold, self.config.memory_size)


class FusedQKVLayer(CachedAttentionLayer):
    """Cached attention where one bias-free linear map `qkv` gives each token's query, key and
    value per head, and `out` maps the heads' reads back to `d_model`. Its config has `rope_base`
    unless `_project` is overridden."""

    def __init__(self, config: MemoryConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _split_qkv(self, x: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries, keys and values `[B, T, H, Dh]` of `x: [B, T, D]`, and the chunk's absolute
        positions `[B, T]` from `start: [B]`."""
        batch, steps, _ = x.shape
        qkv = self.qkv(x).view(batch, steps, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [B, T, H, Dh]
        return q, k, v, chunk_positions(start, steps)

    def _project(self, x: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rotated queries and keys, values, and the chunk's absolute positions `[B, T]`."""
        q, k, v, positions = self._split_qkv(x, start)
        base = self.config.rope_base
        return rotary(q, positions, base), rotary(k, positions, base), v, positions

    def _reference_call(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        """One sequence at a time through `_reference_row`; the heads' reads joined by `out`."""
        state = self._state_or_init(x, state)
        q, k, v, positions = self._project(x, state.position)
        reads, rows = [], []
        for b in range(x.shape[0]):
            row = state.select(torch.tensor([b], device=x.device))
            read, row_state = self._reference_row(q[b], k[b], v[b], positions[b], row)
            reads.append(read)
            rows.append(row_state)
        y = self.out(torch.stack(reads).flatten(2))
        return y, self.state_type.stack(rows)

    @abstractmethod
    def _reference_row(
        self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cache: MemoryState
    ) -> tuple[Tensor, MemoryState]:
        """One sequence: `q, k, v: [T, H, Dh]` as `_project` gives them, `positions: [T]`, its
        state of batch 1 -> reads `[T, H, Dh]` and its next state."""


def token_by_token(
    call: Callable[[Tensor, MemoryState | None], tuple[Tensor, MemoryState]],
    x: Tensor,
    state: MemoryState | None,
) -> tuple[Tensor, MemoryState]:
    """`call` once per token of `x: [B, T, D]`, carrying the state: every memory decision is
    then made after each token, whatever the caller's chunks."""
    if x.shape[1] <= 1:
        return call(x, state)
    outputs = []
    for t in range(x.shape[1]):
        y, state = call(x[:, t : t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state
