"""Causal multi-head attention over a KV cache: full context or a sliding window."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from memory_models.cached_attention import FusedQKVLayer
from memory_models.common import merge_heads, require_rotary_heads
from memory_models.layer import MemoryConfig
from memory_models.slot_cache import (
    empty_cache,
    kept_rows,
    live_then_chunk,
    next_cache,
    reference_kept,
    slot_bytes,
)
from memory_models.state import SlotCacheState


@dataclasses.dataclass
class AttentionState(SlotCacheState):
    keys: Tensor  # [B, L, H, Dh] keys of the cached tokens, already rotated at their positions
    values: Tensor  # [B, L, H, Dh]
    positions: Tensor  # [B, L] long: absolute position of each cached token
    valid: Tensor  # [B, L] bool: live slots (padding and evicted slots are False)
    # [B, L]: running max over queries of the head-averaged attention probability each entry got.
    # Only eviction reads it, so it is tracked only when forget_threshold > 0 (zeros otherwise).
    share: Tensor
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: cache entries dropped so far (window, threshold or capacity)


class AttentionConfig(MemoryConfig):
    """`memory_size` is the window: the most keys any query sees and the most entries cached.

    `None` means full context (the cache grows with the sequence). With `forget_threshold == 0` an
    integer W is a Longformer-style sliding window: each query sees the last W tokens, itself
    included. `forget_threshold > 0`: at the end of each call, cache entries whose attention share
    (running max over queries of the head-averaged probability) is under it are evicted, and if
    more than `memory_size` remain, the lowest-share ones go first.
    """

    kind: Literal["attention"] = "attention"
    memory_size: int | None = Field(default=None, ge=1)
    n_heads: int = Field(default=4, ge=1)
    rope_base: float = Field(default=10000.0, gt=1.0)

    def build(self, d_model: int) -> AttentionLayer:
        require_rotary_heads(self.n_heads, d_model)
        return AttentionLayer(self, d_model)


class AttentionLayer(FusedQKVLayer):
    """Causal multi-head softmax attention (Vaswani et al., 2017) with rotary positions (Su et
    al., 2021); sliding window as in Longformer (Beltagy et al., 2020); eviction by attention
    share as in H2O (Zhang et al., 2023).

    The memory is the KV cache. Keys are rotated at their absolute positions before caching, so a
    cached key stays valid in later calls.

    Visibility (one rule for every setting): a query sees the newest `memory_size` of the keys
    still held, namely the live cache entries and the chunk's tokens up to and including itself
    (all of them when `memory_size` is None). With `forget_threshold == 0` the cache holds the
    last `memory_size` tokens, so this is exactly the sliding window `q - W < k <= q`, and the
    layer is chunk invariant. With `forget_threshold > 0` the cache may hold older, much-attended
    tokens; they stay visible until the newer tokens crowd them out of the query's `memory_size`.

    Eviction at the end of each call, over `[cache ; chunk]`: with `forget_threshold == 0` the
    newest `memory_size` entries are kept. Otherwise entries with share under the threshold go,
    then the `memory_size` highest-share ones are kept (ties: newest). The share depends on which
    queries a call had, so the layer is then not chunk invariant; the fast path equals
    `reference_forward` run on the same chunks.

    Cached keys and values keep their autograd history; a trainer cuts it with `state.detach()`.
    Fast path: one fused `scaled_dot_product_attention` per call under an explicit boolean mask.
    """

    state_type = AttentionState
    config: AttentionConfig

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> AttentionState:
        heads = (self.n_heads, self.head_dim)
        return AttentionState(**empty_cache(batch_size, device, dtype, heads))

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        window = self.config.memory_size
        slots = seq_len if window is None else min(seq_len, window)
        # Per slot: key and value (H * Dh each), position, mask and share.
        return slots * slot_bytes(2 * self.d_model, dtype) + 2 * 8  # + the two counters

    def forward(
        self, x: Tensor, state: AttentionState | None = None
    ) -> tuple[Tensor, AttentionState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, attending over `[cache ; chunk]`."""
        state = self._state_or_init(x, state)
        q, k, v, chunk_pos = self._project(x, state.position)
        keys = torch.cat([state.keys, k], dim=1)  # [B, L+T, H, Dh]
        values = torch.cat([state.values, v], dim=1)
        visible = self._visibility(state.valid, x.shape[1])  # [B, T, L+T]
        read = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), visible[:, None]
        )  # [B, H, T, Dh]
        y = self.out(merge_heads(read))
        share = self._share(q, keys, visible, state.share)
        return y, self._evict(state, keys, values, chunk_pos, share)

    def _visibility(self, cache_valid: Tensor, steps: int) -> Tensor:
        """`[B, T, L+T]` bool: query t sees the newest `memory_size` keys held at its step.

        A key's recency rank is how many held keys are newer than it: for chunk key s it is
        `t - s`, for a live cache entry it is the live entries after it (the cache is kept
        oldest first) plus the `t + 1` chunk tokens up to the query.
        """
        batch = cache_valid.shape[0]
        window = self.config.memory_size
        t = torch.arange(steps, device=cache_valid.device)
        live = cache_valid.long()
        newer_in_cache = live.sum(1, keepdim=True) - live.cumsum(1)  # [B, L]
        cache_rank = newer_in_cache[:, None, :] + (t + 1)[None, :, None]  # [B, T, L]
        chunk_rank = t[:, None] - t[None, :]  # [T, T]; negative: a future token
        cache_visible = cache_valid[:, None, :].expand(-1, steps, -1)
        chunk_visible = chunk_rank >= 0
        if window is not None:
            cache_visible = cache_visible & (cache_rank < window)
            chunk_visible = chunk_visible & (chunk_rank < window)
        return torch.cat([cache_visible, chunk_visible.expand(batch, -1, -1)], dim=2)

    def _share(self, q: Tensor, keys: Tensor, visible: Tensor, cache_share: Tensor) -> Tensor:
        """`[B, L+T]`: each entry's share, raised to the most any of this chunk's queries gave it.

        A decision statistic, not part of the differentiated computation, hence no_grad. It is
        computed only when eviction reads it, so threshold 0 keeps the fused attention alone.
        """
        batch, steps = q.shape[:2]
        fresh = cache_share.new_zeros(batch, steps)
        previous = torch.cat([cache_share, fresh], dim=1)  # [B, L+T]
        if not self._tracks_share:
            return previous
        with torch.no_grad():
            scores = torch.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~visible[:, None], float("-inf"))
            received = scores.softmax(dim=-1).mean(1).amax(1)  # [B, L+T]
            return torch.maximum(previous, received)

    def _evict(
        self, state: AttentionState, keys: Tensor, values: Tensor, chunk_pos: Tensor, share: Tensor
    ) -> AttentionState:
        """The next cache: `[cache ; chunk]` narrowed by `_keep`, compacted oldest first."""
        steps = chunk_pos.shape[1]
        fresh = torch.ones_like(chunk_pos, dtype=torch.bool)
        valid = torch.cat([state.valid, fresh], dim=1)  # [B, L+T]
        positions = torch.cat([state.positions, chunk_pos], dim=1)
        keep = self._keep(valid, share)
        slots = {"keys": keys, "values": values, "positions": positions, "share": share}
        return AttentionState(
            **next_cache(keep, valid, slots, state.position + steps, state.evictions)
        )

    def _reference_row(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_pos: Tensor, cache: AttentionState
    ) -> tuple[Tensor, AttentionState]:
        """One query at a time: list the keys it sees, softmax, weighted sum; then the eviction
        rule over lists."""
        entries, key_pos = live_then_chunk(cache, {"keys": k, "values": v}, chunk_pos)
        keys, values, share = entries["keys"], entries["values"], entries["share"]  # [N, ...]
        reads = []
        for t, query_pos in enumerate(chunk_pos.tolist()):
            seen = self._reference_visible(key_pos, query_pos)
            scores = torch.einsum("hd,nhd->hn", q[t], keys[seen]) / math.sqrt(self.head_dim)
            probs = scores.softmax(dim=-1)  # [H, n]
            reads.append(torch.einsum("hn,nhd->hd", probs, values[seen]))
            if self._tracks_share:
                share[seen] = torch.maximum(share[seen], probs.mean(0).detach())
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        kept = reference_kept(key_pos, share.tolist(), threshold, capacity)
        position = cache.position + len(chunk_pos)
        row = kept_rows(kept, entries, key_pos, position, cache.evictions)
        return torch.stack(reads), AttentionState(**row)

    def _reference_visible(self, key_pos: list[int], query_pos: int) -> list[int]:
        """Indices of the keys a query at `query_pos` sees: the newest `memory_size` held ones."""
        held = sorted((n for n, p in enumerate(key_pos) if p <= query_pos), key=key_pos.__getitem__)
        window = self.config.memory_size
        return held if window is None else held[-window:]
