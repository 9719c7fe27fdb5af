"""Sparse Transformer attention: strided, fixed and Longformer patterns over a bounded KV state."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Self

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.nn import functional as F

from memory_models.cached_attention import FusedQKVLayer
from memory_models.common import require_rotary_heads
from memory_models.layer import MemoryConfig
from memory_models.slot_cache import (
    empty_cache,
    keep_above_threshold,
    kept_rows,
    live_then_chunk,
    next_cache,
    slot_bytes,
)
from memory_models.state import MemoryState


@dataclasses.dataclass
class SparseState(MemoryState):
    keys: Tensor  # [B, L, H, Dh] keys the pattern can still reach, rotated at their positions
    values: Tensor  # [B, L, H, Dh]
    positions: Tensor  # [B, L] long: absolute position of each held key (oldest first)
    valid: Tensor  # [B, L] bool: live slots (padding and dropped slots are False)
    # [B, L]: running max over queries of the head-averaged attention probability each entry got.
    # Only eviction reads it, so it is tracked only when forget_threshold > 0 (zeros otherwise).
    share: Tensor
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    # [B] long: where the next query's local window starts; held keys before it are the
    # long-range memory (strided column, fixed summaries, Longformer globals).
    window_start: Tensor
    evictions: Tensor  # [B] long: entries dropped so far (out of reach, over the cap, threshold)

    def live_entries(self) -> Tensor:
        """Long-range entries held: the part of the state that `memory_size` caps."""
        return (self.valid & (self.positions < self.window_start[:, None])).sum(1)

    def window_entries(self) -> Tensor:
        """Keys of the local window held (never more than `memory_size` either)."""
        return self.valid.sum(1) - self.live_entries()

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "window_entries": self.window_entries().float().mean().item(),
            "evictions": self.evictions.float().mean().item(),
        }


class SparseConfig(MemoryConfig):
    """`memory_size` is l, the stride (`strided`), block (`fixed`) or window (`longformer`)
    length, and the cap on the long-range memory.

    The state holds only the keys a later query can still read: the local window (at most l keys)
    and the long-range memory (the strided column, the fixed summaries, the Longformer globals),
    capped at the newest `memory_size` keys older than the window. `live_entries()` counts the
    long-range memory, the part that would grow with T and that `memory_size` caps;
    `window_entries()` counts the window. Slots never exceed 2 * memory_size; exactly, after T
    tokens at `forget_threshold == 0`: `strided` min(T, 2l), `fixed` T mod l + min(c * floor(T /
    l), l), `longformer` min(T, l - 1 + n_global) (`SparseLayer.slots`).

    `forget_threshold`: after each token, held keys (window or long-range) whose attention
    share (running max over queries of the head-averaged probability) is under it are dropped.

    `summary_len` (c, `fixed` only): the last c positions of every block are its summaries.
    `n_global` (`longformer` only): the first `n_global` positions of the stream are global.
    """

    kind: Literal["sparse"] = "sparse"
    threshold_range = (0.05, 0.5)  # attention shares
    memory_size: int = Field(default=16, ge=1)
    pattern: Literal["strided", "fixed", "longformer"] = "fixed"
    summary_len: int = Field(default=1, ge=1)
    n_global: int = Field(default=1, ge=0)
    n_heads: int = Field(default=4, ge=1)
    rope_base: float = Field(default=10000.0, gt=1.0)

    @model_validator(mode="after")
    def _check_pattern_fields(self) -> Self:
        if self.pattern == "fixed" and self.summary_len >= self.memory_size:
            raise ValueError(
                f"summary_len={self.summary_len} must be under memory_size={self.memory_size}: "
                "the summaries are the last summary_len positions of each block of memory_size"
            )
        if self.pattern == "longformer" and self.n_global > self.memory_size:
            raise ValueError(
                f"n_global={self.n_global} is over memory_size={self.memory_size}: the global "
                "positions are long-range memory, which holds at most memory_size keys"
            )
        if self.pattern == "strided" and self.n_heads % 2 != 0:
            raise ValueError(
                f"n_heads={self.n_heads}: the strided pattern splits the heads in two halves "
                "(local and column); pick an even n_heads"
            )
        return self

    def build(self, d_model: int) -> SparseLayer:
        require_rotary_heads(self.n_heads, d_model)
        return SparseLayer(self, d_model)


@dataclasses.dataclass
class _Held:
    """The keys a call can read, `[state ; chunk]` along dim 1 (live ones in position order)."""

    keys: Tensor  # [B, N, H, Dh]
    values: Tensor  # [B, N, H, Dh]
    positions: Tensor  # [B, N] long
    valid: Tensor  # [B, N] bool
    long_range: Tensor  # [B, N] bool: live and of the pattern's long-range kind
    long_up_to: Tensor  # [B, N] long: long-range keys at or before each entry
    cached: int  # the first `cached` entries come from the state, the rest from the chunk


class SparseLayer(FusedQKVLayer):
    """Sparse Transformer attention (Child et al., 2019, section 4.2) with rotary positions (Su et
    al., 2021); the `longformer` pattern is Longformer's sliding window plus global attention
    (Beltagy et al., 2020, section 3.1), causal.

    Query i (absolute position) reads, with l = `memory_size`:

    * `strided`, the paper's A(1)_i = {max(0, i - l), ..., i} and A(2)_i = {j <= i :
      (i - j) mod l = 0}, split between heads as in the paper's multi-head variant (section 4.3):
      the first half of the heads read A(1) (local), the second half A(2) (column).
    * `fixed`: A(1)_i = {j <= i : floor(j / l) = floor(i / l)} (its own block) united with A(2)_i =
      {j : j mod l >= l - c} (the last c "summary" positions of every earlier block), every head.
    * `longformer`: the window {i - l < j <= i} (as the `attention` kind's window l) united with
      the global positions {j < n_global}, every head. A global position reads everything before
      it, which is all global, so global tokens read and are read by every token.

    Streaming bound. A key stays in the state only while a later query can still read it: its
    window, or its long-range kind (summary, global; for `strided` every older key, since every
    position lies on some later query's column: that reachable set grows with T like full
    attention's). The long-range part is capped at the newest `memory_size` held keys older than
    the query's window, the same cap for every query: visibility is the pattern minus what the cap
    dropped. For `strided` the column heads then read i, i - l and i - 2l; for `fixed` the
    summaries of the last l / c blocks; for `longformer` every global (n_global <= l).

    At `forget_threshold == 0` a query's keys depend on its position only, so a chunk is one call.
    Otherwise held keys whose share is under the threshold are dropped (after the cap) after every
    token: the layer then reads one token per call (`CachedAttentionLayer.forward`), so outputs do
    not depend on how a stream is cut.

    Fast path, block-sparse: the chunk's queries are cut into blocks of l; each block gathers only
    the keys it can reach (the state, the chunk band [block start - l, block end) and the newest l
    long-range chunk keys before that band) and attends over them, so the work and memory are
    linear in T. Held keys keep their autograd history; a trainer cuts it with `state.detach()`.
    """

    state_type = SparseState
    config: SparseConfig

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> SparseState:
        cache = empty_cache(batch_size, device, dtype, (self.n_heads, self.head_dim))
        return SparseState(window_start=self._window_start(cache["position"]), **cache)

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # Per slot: key and value (H * Dh each), position, mask and share.
        per_slot = slot_bytes(2 * self.d_model, dtype)
        return self.slots(seq_len) * per_slot + 3 * 8  # + position, window_start, evictions

    def slots(self, seq_len: int) -> int:
        """Slots held after `seq_len` tokens at threshold 0 (an upper bound otherwise)."""
        block, pattern = self.config.memory_size, self.config.pattern
        if pattern == "strided":
            return min(seq_len, 2 * block)
        if pattern == "fixed":
            return seq_len % block + min(self.config.summary_len * (seq_len // block), block)
        return min(seq_len, block - 1 + self.config.n_global)

    def _window_start(self, query: Tensor | int) -> Tensor | int:
        """First position of the local window of a query at `query` (int or long tensor)."""
        block = self.config.memory_size
        if self.config.pattern == "strided":
            return query - block
        if self.config.pattern == "fixed":
            return query // block * block
        return query - block + 1

    def _is_long_range(self, position: Tensor | int) -> Tensor | bool:
        """Whether a key at `position`, once older than a query's window, can still be read."""
        if self.config.pattern == "fixed":
            block = self.config.memory_size
            return position % block >= block - self.config.summary_len
        if self.config.pattern == "longformer":
            return position < self.config.n_global
        return position >= 0  # strided: every position lies on some later query's column

    def _forward_call(
        self, x: Tensor, state: SparseState | None = None
    ) -> tuple[Tensor, SparseState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, each query block over the keys it can reach."""
        state = self._state_or_init(x, state)
        if x.shape[1] == 0:  # an empty chunk reads nothing and changes nothing
            return self.out(x), state
        q, k, v, chunk_pos = self._project(x, state.position)
        held = self._held(state, k, v, chunk_pos)
        index, present = self._candidates(held, x.shape[1])  # [B, nb, C]
        query_pos, query_ok = self._query_blocks(chunk_pos, index.shape[1])  # [B, nb, bs]
        visible = self._visibility(held, index, present, query_pos, query_ok)
        read, share = self._attend(q, held, index, visible, query_ok, state.share)
        y = self.out(read.flatten(2))
        return y, self._evict(state, held, share, steps=x.shape[1])

    def _held(self, state: SparseState, k: Tensor, v: Tensor, chunk_pos: Tensor) -> _Held:
        fresh = torch.ones_like(chunk_pos, dtype=torch.bool)
        valid = torch.cat([state.valid, fresh], dim=1)  # [B, N]
        positions = torch.cat([state.positions, chunk_pos], dim=1)
        long_range = valid & self._is_long_range(positions)
        return _Held(
            keys=torch.cat([state.keys, k], dim=1),
            values=torch.cat([state.values, v], dim=1),
            positions=positions,
            valid=valid,
            long_range=long_range,
            long_up_to=long_range.long().cumsum(1),
            cached=state.keys.shape[1],
        )

    def _candidates(self, held: _Held, steps: int) -> tuple[Tensor, Tensor]:
        """Per query block, the indices into `held` it may read: `[B, nb, C]` and a present mask.

        C = slots (the state) + 2l (the band [block start - l, block end)) + l (the newest l
        long-range chunk keys before the band). The band holds the block's windows, and the
        long-range keys a query reads lie in the state, the band or that newest-l list.
        """
        block, device, slots = self.config.memory_size, held.positions.device, held.cached
        batch = held.positions.shape[0]
        starts = torch.arange(0, steps, block, device=device)  # [nb]
        blocks = starts.shape[0]
        state_index = torch.arange(slots, device=device).expand(batch, blocks, slots)
        band = starts[:, None] - block + torch.arange(2 * block, device=device)  # [nb, 2l]
        band_ok = ((band >= 0) & (band < steps)).expand(batch, -1, -1)
        band = (slots + band.clamp(0, steps - 1)).expand(batch, -1, -1)
        older, older_ok = self._newest_long_range(held.long_range[:, slots:], starts - block)
        index = torch.cat([state_index, band, slots + older], dim=2)
        state_ok = torch.ones_like(state_index, dtype=torch.bool)
        return index, torch.cat([state_ok, band_ok, older_ok], dim=2)

    def _newest_long_range(self, long_range: Tensor, before: Tensor) -> tuple[Tensor, Tensor]:
        """Chunk indices of the newest l long-range keys at indices under `before: [nb]`.

        `long_range: [B, T]`. Returns `[B, nb, l]` indices (oldest first) and their present mask.
        """
        block, steps = self.config.memory_size, long_range.shape[1]
        counts = F.pad(long_range.long().cumsum(1), (1, 0))  # [B, T+1]: long-range before index
        below = counts[:, before.clamp(0, steps)]  # [B, nb]
        order = (~long_range).long().argsort(dim=1, stable=True)  # long-range indices first
        rank = below[:, :, None] - block + torch.arange(block, device=below.device)  # [B, nb, l]
        index = order.gather(1, rank.clamp(min=0).flatten(1)).view_as(rank)
        return index, rank >= 0

    def _query_blocks(self, chunk_pos: Tensor, blocks: int) -> tuple[Tensor, Tensor]:
        """Query positions `[B, nb, l]` (the chunk padded to whole blocks) and which are real."""
        block, steps = self.config.memory_size, chunk_pos.shape[1]
        offset = torch.arange(blocks * block, device=chunk_pos.device)
        positions = chunk_pos[:, :1] + offset  # [B, nb*l]
        real = (offset < steps).expand_as(positions)
        return positions.view(-1, blocks, block), real.reshape(-1, blocks, block)

    def _visibility(
        self, held: _Held, index: Tensor, present: Tensor, query_pos: Tensor, query_ok: Tensor
    ) -> Tensor:
        """`[B, nb, H or 1, bs, C]` bool: which candidate keys each query reads, per head."""
        flat = index.flatten(1)

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, flat).view_as(index)[:, :, None, :]  # [B, nb, 1, C]

        long_before = self._long_range_before(held, self._window_start(query_pos))
        key, query = pick(held.positions), query_pos[..., None]
        window, long_range = self._reach(
            query,
            key,
            present[:, :, None, :] & pick(held.valid),
            pick(held.long_range),
            pick(held.long_up_to),
            long_before[..., None],
        )  # [B, nb, bs, C]
        return self._per_head(window, long_range, query - key, query_ok)

    def _reach(
        self,
        query: Tensor,
        key: Tensor,
        valid: Tensor,
        long_kind: Tensor,
        long_up_to: Tensor,
        long_before: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The keys a query can reach, as (window, long range) bool masks; shapes broadcast.

        `query`, `key`: positions; `valid`: the key is held; `long_kind`: it is of the pattern's
        long-range kind; `long_up_to`: long-range keys at or before it; `long_before`:
        long-range keys before the query's window. The long range is the newest `memory_size`
        of them: a key is in it while fewer than that many lie between it and the window. The
        same rule decides the visibility of every query and what the state keeps.
        """
        start = self._window_start(query)
        live = valid & (key <= query)
        window = live & (key >= start)
        newer = long_before - long_up_to
        long_range = live & long_kind & (key < start) & (newer < self.config.memory_size)
        return window, long_range

    def _long_range_before(self, held: _Held, start: Tensor) -> Tensor:
        """Live long-range keys at positions under `start: [B, ...]`, counted.

        The state's keys are compared one by one (a few slots); the chunk's are counted from a
        prefix sum, since its positions are consecutive. Linear in T.
        """
        batch, slots = start.shape[0], held.cached
        flat = start.reshape(batch, -1)  # [B, Q]
        state_long, state_pos = held.long_range[:, :slots], held.positions[:, :slots]
        in_state = (state_long[:, None, :] & (state_pos[:, None, :] < flat[..., None])).sum(2)
        chunk_long = held.long_range[:, slots:]
        counts = F.pad(chunk_long.long().cumsum(1), (1, 0))  # [B, T+1]
        offset = (flat - held.positions[:, slots : slots + 1]).clamp(0, chunk_long.shape[1])
        return (in_state + counts.gather(1, offset)).view_as(start)

    def _per_head(
        self, window: Tensor, long_range: Tensor, gap: Tensor, query_ok: Tensor
    ) -> Tensor:
        """Combine the window and long-range reads into per-head masks (padded queries read all,
        so that their softmax stays finite; their reads are discarded)."""
        padding = ~query_ok[..., None]  # [B, nb, bs, 1]
        if self.config.pattern != "strided":
            return ((window | long_range) | padding)[:, :, None]
        column = (window | long_range) & (gap % self.config.memory_size == 0)
        local_heads = self.n_heads // 2
        heads = [window | padding] * local_heads + [column | padding] * local_heads
        return torch.stack(heads, dim=2)  # [B, nb, H, bs, C]

    def _attend(
        self,
        q: Tensor,
        held: _Held,
        index: Tensor,
        visible: Tensor,
        query_ok: Tensor,
        cache_share: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Reads `[B, T, H, Dh]` and every held key's share `[B, N]` (see `_share`)."""
        batch, steps = q.shape[:2]
        blocks, size = query_ok.shape[1:]
        keys, values = self._gather(held.keys, index), self._gather(held.values, index)
        queries = F.pad(q, (0, 0, 0, 0, 0, blocks * size - steps)).view(
            batch, blocks, size, self.n_heads, self.head_dim
        )
        scores = torch.einsum("bnqhd,bnchd->bnhqc", queries, keys) / math.sqrt(self.head_dim)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)  # [B, nb, H, bs, C]
        read = torch.einsum("bnhqc,bnchd->bnqhd", probs, values).flatten(1, 2)[:, :steps]
        return read, self._share(probs, index, query_ok, cache_share, steps)

    @staticmethod
    def _gather(entries: Tensor, index: Tensor) -> Tensor:
        """`entries: [B, N, H, Dh]` at `index: [B, nb, C]` -> `[B, nb, C, H, Dh]`.

        One `index_select` over the flattened batch: its backward is a single `index_add`.
        """
        batch, count = entries.shape[:2]
        rows = torch.arange(batch, device=index.device)[:, None, None] * count
        picked = entries.flatten(0, 1).index_select(0, (rows + index).flatten())
        return picked.view(*index.shape, *entries.shape[2:])

    def _share(
        self, probs: Tensor, index: Tensor, query_ok: Tensor, cache_share: Tensor, steps: int
    ) -> Tensor:
        """`[B, N]`: each held key's share, raised to the most any of this chunk's queries gave it.

        A decision statistic, not part of the differentiated computation, hence no_grad. Tracked
        only when eviction reads it.
        """
        previous = F.pad(cache_share, (0, steps))  # [B, N]: chunk keys start at 0
        if not self._tracks_share:
            return previous
        with torch.no_grad():
            received = (probs.mean(2) * query_ok[..., None]).amax(2)  # [B, nb, C]
            return previous.scatter_reduce(
                1, index.flatten(1), received.flatten(1), "amax", include_self=True
            )

    def _evict(self, state: SparseState, held: _Held, share: Tensor, steps: int) -> SparseState:
        """The next state: the held keys the next query can still reach, minus the threshold."""
        position = state.position + steps  # [B]
        start = self._window_start(position)
        window, long_range = self._reach(
            position[:, None],
            held.positions,
            held.valid,
            held.long_range,
            held.long_up_to,
            self._long_range_before(held, start)[:, None],
        )  # [B, N]
        reach = window | long_range
        keep = keep_above_threshold(share, reach, self.config.forget_threshold)
        slots = {
            "keys": held.keys,
            "values": held.values,
            "positions": held.positions,
            "share": share,
        }
        cache = next_cache(keep, held.valid, slots, position, state.evictions)
        return SparseState(window_start=start, **cache)

    def _reference_call(
        self, x: Tensor, state: SparseState | None = None
    ) -> tuple[Tensor, SparseState]:
        if x.shape[1] == 0:  # an empty chunk reads nothing and changes nothing
            return self.out(x), self._state_or_init(x, state)
        return super()._reference_call(x, state)

    def _reference_row(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_pos: Tensor, cache: SparseState
    ) -> tuple[Tensor, SparseState]:
        """One query at a time: dense scores over every held key, the pattern's boolean mask per
        head, softmax, weighted sum; then the keys the next query can reach, over lists."""
        entries, key_pos = live_then_chunk(cache, {"keys": k, "values": v}, chunk_pos)
        keys, values, share = entries["keys"], entries["values"], entries["share"]  # [N, ...]
        cached = len(key_pos) - len(chunk_pos)
        reads = []
        for t, query in enumerate(chunk_pos.tolist()):
            held = cached + t + 1  # the cache and the chunk up to the query
            mask = self._reference_mask(key_pos[:held], query)  # [H, held]
            scores = torch.einsum("hd,nhd->hn", q[t], keys[:held]) / math.sqrt(self.head_dim)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            reads.append(torch.einsum("hn,nhd->hd", probs, values[:held]))
            if self._tracks_share:
                share[:held] = torch.maximum(share[:held], probs.mean(0).detach())
        next_pos = int(cache.position[0]) + len(chunk_pos)
        kept = self._reference_kept(key_pos, share.tolist(), next_pos)
        position = cache.position + len(chunk_pos)
        row = kept_rows(kept, entries, key_pos, position, cache.evictions)
        window_start = torch.tensor([self._window_start(next_pos)], device=q.device)
        return torch.stack(reads), SparseState(window_start=window_start, **row)

    def _reference_reach(self, key_pos: list[int], query: int) -> tuple[list[int], list[int]]:
        """Indices of the held keys a query at `query` can reach: (its window, its long range).

        The long range is the newest `memory_size` held keys of the long-range kind that are older
        than the window.
        """
        start = self._window_start(query)
        window = [n for n, j in enumerate(key_pos) if start <= j <= query]
        older = [n for n, j in enumerate(key_pos) if j < start and self._is_long_range(j)]
        older = sorted(older, key=key_pos.__getitem__)[-self.config.memory_size :]
        return window, older

    def _reference_mask(self, key_pos: list[int], query: int) -> Tensor:
        """`[H, N]` bool: the keys each head of a query at `query` reads."""
        window, older = self._reference_reach(key_pos, query)
        mask = torch.zeros(
            self.n_heads, len(key_pos), dtype=torch.bool, device=self.out.weight.device
        )
        if self.config.pattern != "strided":
            mask[:, window + older] = True
            return mask
        column = [n for n in window + older if (query - key_pos[n]) % self.config.memory_size == 0]
        local_heads = self.n_heads // 2
        mask[:local_heads, window] = True
        mask[local_heads:, column] = True
        return mask

    def _reference_kept(self, key_pos: list[int], share: list[float], next_pos: int) -> list[int]:
        """Indices of the keys that stay held, oldest first: those the next query can reach, with
        share at least the threshold."""
        window, older = self._reference_reach(key_pos, next_pos)
        threshold = self.config.forget_threshold
        kept = [n for n in window + older if threshold <= 0.0 or share[n] >= threshold]
        return sorted(kept, key=key_pos.__getitem__)
