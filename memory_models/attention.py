"""Causal multi-head attention over a KV cache: full context, or bounded under an eviction
policy (window, sinks, share threshold, H2O, TOVA) applied per token."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.nn import functional as F

from memory_models.cached_attention import FusedQKVLayer
from memory_models.common import merge_heads, require_rotary_heads
from memory_models.layer import MemoryConfig
from memory_models.slot_cache import (
    empty_cache,
    keep_above_threshold,
    keep_largest,
    keep_newest,
    kept_rows,
    live_then_chunk,
    next_cache,
    slot_bytes,
)
from memory_models.state import SlotCacheState


@dataclasses.dataclass
class AttentionState(SlotCacheState):
    keys: Tensor  # [B, L, H, Dh] keys of the cached tokens, already rotated at their positions
    values: Tensor  # [B, L, H, Dh]
    positions: Tensor  # [B, L] long: absolute position of each cached token
    valid: Tensor  # [B, L] bool: live slots (padding and evicted slots are False)
    # [B, L]: the eviction policy's statistic of each entry, from the head-averaged attention
    # probabilities queries gave it (see AttentionConfig). Tracked only where eviction reads it
    # (zeros under a positional policy at threshold 0).
    share: Tensor
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: cache entries dropped so far (window, threshold or capacity)


#: Eviction policies of the attention cache, each a documented rule (see `AttentionConfig`).
EvictionPolicy = Literal["window", "sinks", "threshold", "h2o", "tova"]
#: Policies whose cache depends on positions alone (at threshold 0): one fused call per chunk.
POSITIONAL_POLICIES = frozenset({"window", "sinks"})


def sinks_for(memory_size: int) -> int:
    """StreamingLLM's 4 attention sinks, fewer where the cache is small: at most a quarter of
    it, at least one (a `sinks` policy must leave room for recent tokens)."""
    return min(4, max(1, memory_size // 4))


class AttentionConfig(MemoryConfig):
    """`memory_size` bounds the cache: the most keys any query sees, itself included, and the
    most entries held between tokens. `None` means full context (the cache grows with the
    sequence; `window` eviction only).

    `eviction` chooses which entry leaves when the cache is full; every rule is applied per token
    before the token reads (so the query sees at most `memory_size` keys: itself and at most
    `memory_size - 1` kept ones):

    * `window` (FIFO): the oldest goes: the sliding window `q - W < k <= q` (Longformer).
    * `sinks`: the first `sinks` tokens never go, the oldest of the rest does (StreamingLLM,
      Xiao et al. 2023: attention sinks plus a window).
    * `threshold`: the entry with the lowest share goes, share being the most any query gave it
      (the running max over queries of the head-averaged attention probability).
    * `h2o`: the newest `(memory_size - 1) // 2` kept entries never go; of the rest the one with
      the lowest accumulated attention (sum over queries of the head-averaged probability) goes
      (H2O, Zhang et al. 2023: heavy hitters plus recent tokens).
    * `tova`: the entry the latest query gave the lowest head-averaged probability goes (TOVA,
      Oren et al. 2024, "Transformers are Multi-State RNNs").

    Ties go to the older entry. `forget_threshold > 0` first drops every entry whose policy
    statistic (running max share for `window`, `sinks` and `threshold`, accumulated attention
    for `h2o`, the latest query's probability for `tova`) is under it, whatever the fill.
    """

    kind: Literal["attention"] = "attention"
    threshold_range = (0.05, 0.5)  # attention shares
    memory_size: int | None = Field(default=None, ge=1)
    n_heads: int = Field(default=4, ge=1)
    rope_base: float = Field(default=10000.0, gt=1.0)
    eviction: EvictionPolicy = "window"
    #: Tokens at the start of the stream the `sinks` policy never evicts (StreamingLLM uses 4).
    sinks: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _policy_fits_the_bound(self) -> AttentionConfig:
        if self.eviction != "window" and self.memory_size is None:
            raise ValueError(
                f"eviction={self.eviction!r} needs a bounded cache: set memory_size (the cache "
                "bound the policy keeps), or use eviction='window' for full context"
            )
        if self.eviction == "sinks" and self.sinks >= self.memory_size:
            raise ValueError(
                f"sinks={self.sinks} leaves no room for recent tokens in memory_size="
                f"{self.memory_size}: use fewer sinks or a larger memory_size"
            )
        return self

    @property
    def decides_per_token(self) -> bool:
        """True when what stays depends on attention shares, so eviction runs token by token."""
        return self.forget_threshold > 0.0 or self.eviction not in POSITIONAL_POLICIES

    def build(self, d_model: int) -> AttentionLayer:
        require_rotary_heads(self.n_heads, d_model)
        return AttentionLayer(self, d_model)


class AttentionLayer(FusedQKVLayer):
    """Causal multi-head softmax attention (Vaswani et al., 2017) with rotary positions (Su et
    al., 2021) over a bounded KV cache with a choice of eviction rules (see `AttentionConfig`):
    sliding window (Longformer, Beltagy et al., 2020), attention sinks (StreamingLLM, Xiao et al.,
    2023), attention-share threshold, H2O (Zhang et al., 2023) and TOVA (Oren et al., 2024).

    The memory is the KV cache. Keys are rotated at their absolute positions before caching, so a
    cached key stays valid in later calls.

    One rule, per token, for every policy: before token t reads, the cache is narrowed to
    `memory_size - 1` entries (after the threshold's drops) by the policy, using the statistics
    of queries before t; then the token joins the cache and its query attends over all of it.
    Outputs and state therefore do not depend on how a stream is cut into calls.

    Fast path: one fused `scaled_dot_product_attention` over `[cache ; chunk]` under a boolean
    mask of what each query sees, then the cache narrowed once. With a positional policy
    (`window`, `sinks`) at threshold 0 the mask depends on positions only (key j visible to query
    i when `i - W < j <= i`, or `j < sinks` for `sinks`). Otherwise the decisions are made first,
    token by token but without gradients and on precomputed scores (`_decide_per_token`): the
    masks they give are exactly those of the per-token rule. `reference_forward` is the rule
    written over Python lists, token by token.

    Cached keys and values keep their autograd history; a trainer cuts it with `state.detach()`.
    """

    state_type = AttentionState
    config: AttentionConfig

    @property
    def _tracks_share(self) -> bool:
        return self.config.decides_per_token

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
        """`x: [B, T, D]` -> `y: [B, T, D]`: one masked attention over `[cache ; chunk]`, with
        the per-token decisions made first where the policy reads shares."""
        state = self._state_or_init(x, state)
        steps = x.shape[1]
        if steps == 0:
            return torch.zeros_like(x), state
        q, k, v, chunk_pos = self._project(x, state.position)
        keys = torch.cat([state.keys, k], dim=1)  # [B, N = L+T, H, Dh]
        values = torch.cat([state.values, v], dim=1)
        positions = torch.cat([state.positions, chunk_pos], dim=1)  # [B, N]
        candidates = torch.cat([state.valid, torch.ones_like(chunk_pos, dtype=torch.bool)], 1)
        if self._tracks_share:
            visible, keep, share = self._decide_per_token(q, keys, positions, state)
        else:
            visible = self._visibility(positions, candidates, chunk_pos)  # [B, T, N]
            # The cache the per-token rule leaves: what the chunk's last query saw.
            keep = candidates & self._in_window(positions, chunk_pos[:, -1:])
            share = torch.cat([state.share, state.share.new_zeros(chunk_pos.shape)], dim=1)
        read = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), visible[:, None]
        )  # [B, H, T, Dh]
        slots = {"keys": keys, "values": values, "positions": positions, "share": share}
        position = state.position + steps
        return self.out(merge_heads(read)), AttentionState(
            **next_cache(keep, candidates, slots, position, state.evictions)
        )

    def _forward_call(
        self, x: Tensor, state: AttentionState | None
    ) -> tuple[Tensor, AttentionState]:
        return self.forward(x, state)

    def _visibility(self, positions: Tensor, valid: Tensor, query_pos: Tensor) -> Tensor:
        """`[B, T, N]` bool: key n (at `positions[:, n]`) is visible to query t."""
        key_pos, query = positions[:, None, :], query_pos[:, :, None]
        causal = valid[:, None, :] & (key_pos <= query)
        return causal & self._in_window(key_pos, query)

    def _in_window(self, key_pos: Tensor, query_pos: Tensor) -> Tensor:
        """Keys a query at `query_pos` may see under a positional policy (the cache is then
        gapless, so recency is the position difference)."""
        window = self.config.memory_size
        if window is None:
            return torch.ones_like(key_pos, dtype=torch.bool) & (query_pos >= 0)
        if self.config.eviction == "sinks":
            sinks = self.config.sinks
            return (key_pos < sinks) | (query_pos - key_pos < window - sinks)
        return query_pos - key_pos < window

    @torch.no_grad()
    def _decide_per_token(
        self, q: Tensor, keys: Tensor, positions: Tensor, state: AttentionState
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The policy run token by token over `[cache ; chunk]` (N slots, oldest first): before
        token t reads, the held entries are narrowed (`_make_room`) and t joins; its
        head-averaged probabilities update the statistic. Decisions only: no gradient flows
        through them, so the reads are then one masked attention with these masks.

        Returns what each query sees `[B, T, N]`, what is held after the last token `[B, N]`
        and the statistic `[B, N]`."""
        cached, steps = state.valid.shape[1], q.shape[1]
        # In float64: a decision must not flip with the rounding of how many queries and keys a
        # call batched (a session's one token against a whole row's), or a near-tie would make
        # the cut matter.
        scores = torch.einsum("bthd,bnhd->bhtn", q.double(), keys.double())
        scores = scores / math.sqrt(self.head_dim)  # [B, H, T, N]
        held = F.pad(state.valid, (0, steps))  # [B, N]: the chunk's tokens are not held yet
        statistic = F.pad(state.share.double(), (0, steps))
        joins = torch.eye(cached + steps, dtype=torch.bool, device=q.device)[cached:]  # [T, N]
        seen = []
        for t in range(steps):
            held = self._make_room(held, statistic, positions) | joins[t]
            seen.append(held)
            probs = scores[:, :, t].masked_fill(~held[:, None], float("-inf")).softmax(-1)
            statistic = self._update_statistic(statistic, probs.mean(1))  # [B, N]
            # Rounded as a state between one-token calls is, so both see the same values.
            statistic = statistic.to(state.share.dtype).double()
        return torch.stack(seen, dim=1), held, statistic.to(state.share.dtype)

    def _update_statistic(self, previous: Tensor, received: Tensor) -> Tensor:
        """Each entry's statistic after one more query gave it `received` (`[B, N]`)."""
        policy = self.config.eviction
        if policy == "h2o":
            return previous + received
        if policy == "tova":
            return received
        return torch.maximum(previous, received)

    def _make_room(self, valid: Tensor, statistic: Tensor, positions: Tensor) -> Tensor:
        """`[B, L]` bool: the live entries that stay before the next token joins: over the
        threshold, and at most `memory_size - 1` of them chosen by the policy."""
        keep = keep_above_threshold(statistic, valid, self.config.forget_threshold)
        if self.config.memory_size is None:
            return keep
        room = self.config.memory_size - 1
        policy = self.config.eviction
        if policy == "window":
            return keep_newest(keep, room)
        if policy == "sinks":
            sink = keep & (positions < self.config.sinks)
            return sink | keep_newest(keep & ~sink, room - sink.sum(1, keepdim=True))
        if policy == "h2o":
            recent = keep_newest(keep, room // 2)
            return recent | keep_largest(keep & ~recent, statistic, room - room // 2)
        return keep_largest(keep, statistic, room)

    def _reference_row(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_pos: Tensor, cache: AttentionState
    ) -> tuple[Tensor, AttentionState]:
        """One sequence, one token at a time over Python lists: make room by the policy, join,
        softmax over every held key, weighted sum, update the statistic."""
        entries, key_pos = live_then_chunk(cache, {"keys": k, "values": v}, chunk_pos)
        keys, values = entries["keys"], entries["values"]
        statistic = entries["share"].clone()
        held: list[int] = list(range(len(key_pos) - len(chunk_pos)))
        reads = []
        for t in range(len(chunk_pos)):
            held = self._reference_room(held, key_pos, statistic.tolist())
            held.append(len(key_pos) - len(chunk_pos) + t)
            scores = torch.einsum("hd,nhd->hn", q[t], keys[held]) / math.sqrt(self.head_dim)
            probs = scores.softmax(dim=-1)  # [H, n]
            reads.append(torch.einsum("hn,nhd->hd", probs, values[held]))
            if self._tracks_share:
                statistic[held] = self._update_statistic(
                    statistic[held][None], probs.mean(0).detach()[None]
                )[0]
        position = cache.position + len(chunk_pos)
        row = kept_rows(held, {**entries, "share": statistic}, key_pos, position, cache.evictions)
        return torch.stack(reads), AttentionState(**row)

    def _reference_room(
        self, held: list[int], key_pos: list[int], statistic: list[float]
    ) -> list[int]:
        """`_make_room` over lists: the indices of `held` that stay, oldest first."""
        threshold, window = self.config.forget_threshold, self.config.memory_size
        kept = [n for n in held if threshold <= 0.0 or statistic[n] >= threshold]
        if window is None:
            return kept
        room, policy = window - 1, self.config.eviction
        by_age = sorted(kept, key=key_pos.__getitem__)
        if policy == "window":
            chosen = _newest(by_age, room)
        elif policy == "sinks":
            sinks = [n for n in by_age if key_pos[n] < self.config.sinks]
            rest = [n for n in by_age if key_pos[n] >= self.config.sinks]
            chosen = sinks + _newest(rest, room - len(sinks))
        elif policy == "h2o":
            recent = _newest(by_age, room // 2)
            others = [n for n in by_age if n not in recent]
            chosen = recent + _highest(others, statistic, key_pos, room - room // 2)
        else:
            chosen = _highest(by_age, statistic, key_pos, room)
        return sorted(chosen, key=key_pos.__getitem__)


def _newest(by_age: list[int], count: int) -> list[int]:
    """The last `count` of `by_age` (none for a count of 0 or less)."""
    return by_age[max(0, len(by_age) - count) :] if count > 0 else []


def _highest(
    entries: list[int], statistic: list[float], key_pos: list[int], count: int
) -> list[int]:
    """The `count` entries of highest statistic (ties: the newer stays)."""
    if count <= 0:
        return []
    return sorted(entries, key=lambda n: (statistic[n], key_pos[n]))[-count:]
