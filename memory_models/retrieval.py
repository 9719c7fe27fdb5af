"""Retrieval memory: kNN attention over an external store of past keys and values."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.cached_attention import FusedQKVLayer
from memory_models.common import chunk_positions, require_rotary_heads, rotary
from memory_models.knn_index import IndexKind, make_index, top_k
from memory_models.layer import MemoryConfig
from memory_models.slot_cache import (
    compact_slots,
    empty_cache,
    next_cache,
    reference_kept,
    slot_bytes,
)
from memory_models.state import SlotCacheState

# QK-norm's learned temperature (Henry et al., 2020) starts here: unit queries and keys give
# cosine scores in [-1, 1], which softmax would otherwise spread almost evenly.
_INITIAL_TEMPERATURE = 10.0
# Queries scored at once: bounds a call's score matrices to [B, H, block, N + T].
_QUERY_BLOCK = 256


@dataclasses.dataclass
class RetrievalState(SlotCacheState):
    """The store (the memory proper, at most `memory_size` entries) and the local window."""

    keys: Tensor  # [B, N, H, Dh] unit-length keys of the stored tokens, unrotated, detached
    values: Tensor  # [B, N, H, Dh]
    positions: Tensor  # [B, N] long: absolute position of each stored token, oldest first
    valid: Tensor  # [B, N] bool: live entries (padding and evicted slots are False)
    # [B, N]: decayed retrieval share (see RetrievalLayer); zeros when forget_threshold is 0.
    share: Tensor
    window_keys: Tensor  # [B, L, H, Dh] unit-length keys of the last local_window - 1 tokens
    window_values: Tensor  # [B, L, H, Dh]
    window_positions: Tensor  # [B, L] long, oldest first
    window_valid: Tensor  # [B, L] bool
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: store entries dropped so far (threshold or capacity)


class RetrievalConfig(MemoryConfig):
    """`memory_size` is the store's capacity in entries (past tokens' keys and values per head).

    A token enters the store when it leaves the local window: `local_window` tokens after its
    own, so the query at position p can retrieve tokens up to p - local_window and attends
    locally to the `local_window` tokens p - local_window < s <= p. Each query retrieves its
    `top_k` stored entries of largest inner product (per head). The state holds at most
    `memory_size` store entries (its `live_entries`) and, beside them, the window's last
    `local_window - 1` tokens.

    `forget_threshold`: after each token, stored entries whose retrieval share is under it
    are evicted, and if more than `memory_size` remain the lowest-share ones go first. An entry's
    share starts at 1 when it enters the store and is multiplied by `share_decay` at every token
    after; a query that retrieves it raises it to the probability the query gave it (the mean over
    heads of its softmax weight among the retrieved) if that is higher. So an entry nobody
    retrieves is evicted about log(threshold) / log(share_decay) tokens after it entered. 0 keeps
    the paper's FIFO store. `index` picks exact top-k (torch) or a faiss index.
    """

    kind: Literal["retrieval"] = "retrieval"
    threshold_range = (0.95, 0.999)  # decayed retrieval shares
    memory_size: int = Field(default=256, ge=1)
    n_heads: int = Field(default=4, ge=1)
    top_k: int = Field(default=8, ge=1)
    local_window: int = Field(default=16, ge=1)
    share_decay: float = Field(default=0.99, ge=0.0, le=1.0)
    index: IndexKind = "exact"

    def _nothing_to_forget(self) -> str | None:
        if self.share_decay == 1.0:
            return (
                "forget_threshold > 0 never evicts when share_decay == 1 (a share then never "
                "falls below the 1 an entry starts with): set share_decay below 1 or "
                "forget_threshold to 0"
            )
        return super()._nothing_to_forget()

    def build(self, d_model: int) -> RetrievalLayer:
        require_rotary_heads(self.n_heads, d_model)
        return RetrievalLayer(self, d_model)


@dataclasses.dataclass
class _Candidates:
    """Every entry a call can retrieve or keep, oldest first: the store's N slots, then the
    "fresh" tokens (the window's and the call's), which enter the store `local_window` tokens
    after their own. Keys and values are detached: the memory is a stop-gradient."""

    keys: Tensor  # [B, N + C, H, Dh]
    values: Tensor  # [B, N + C, H, Dh]
    positions: Tensor  # [B, N + C] long
    stored: int  # N
    fresh_valid: Tensor  # [B, C] bool

    @property
    def fresh_positions(self) -> Tensor:
        return self.positions[:, self.stored :]


@dataclasses.dataclass
class _Entry:
    """One token in `reference_forward`'s lists: `key, value: [H, Dh]`."""

    key: Tensor
    value: Tensor
    position: int
    share: float = 0.0


class RetrievalLayer(FusedQKVLayer):
    """kNN-augmented attention of the Memorizing Transformer (Wu et al., 2022, section 3): an
    external store of past (key, value) pairs searched by nearest neighbours, as kNN-LM
    (Khandelwal et al., 2020) searches its datastore, next to local attention.

    Per head h, from unit-length queries and keys (the paper normalises both; the scale is a
    learned temperature tau_h, QK-norm of Henry et al., 2020):

    * local: causal softmax attention over the last `local_window` tokens, rotary positions
      (Su et al., 2021) -> o_local;
    * memory: the query's `top_k` store entries by inner product, softmax over just those, no
      positions (as in the paper) -> o_mem; zeros while nothing is retrievable;
    * o = g_h * o_mem + (1 - g_h) * o_local with a learned per-head gate g_h = sigmoid(b_h),
      as in the paper, then the output projection.

    The store takes a token when it leaves the local window (see `RetrievalConfig`). Within a
    call a query retrieves from the newest `memory_size` entries held at its step (the store
    plus the tokens that have left the window by then); at the end of the call the store is
    rebuilt from those candidates: FIFO, the newest `memory_size`, at `forget_threshold == 0`,
    else threshold then highest share (ties: newest). At threshold 0 this is exactly a FIFO
    store updated token by token; with a threshold the layer reads one token per call
    (`CachedAttentionLayer.forward`), so eviction is judged after every token. Either way the
    layer is chunk invariant.

    Stored entries are a stop-gradient, as in the paper: every key and value the memory branch
    reads is detached, and the state is detached when written. Gradients reach the queries, the
    temperature and the gate through the retrieved scores, and the keys and values through the
    local branch.

    Fast path: one batched local attention, one index search over the store entries that no
    fresh token can crowd out during the call, and an exact masked scan over the rest (the
    fresh tokens, and the oldest entries they may crowd out), merged into one top-k. With the
    exact index a call costs O(T (N + T)) scores, like attention over the store and the call.
    The state is plain tensors, so a faiss index is built from the store at every call: that
    pays only when a call's queries are many against a large store (bench_retrieval.py).
    """

    state_type = RetrievalState
    config: RetrievalConfig

    def __init__(self, config: RetrievalConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        initial = torch.full((config.n_heads,), math.log(_INITIAL_TEMPERATURE))
        self.log_temperature = nn.Parameter(initial)
        self.gate = nn.Parameter(torch.zeros(config.n_heads))  # b_h: g = 1/2 at the start
        self.index = make_index(config.index)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> RetrievalState:
        heads = (self.n_heads, self.head_dim)
        window = empty_cache(batch_size, device, dtype, heads)
        return RetrievalState(
            window_keys=window["keys"],
            window_values=window["values"],
            window_positions=window["positions"],
            window_valid=window["valid"],
            **empty_cache(batch_size, device, dtype, heads),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        window = self.config.local_window
        stored = min(max(seq_len - window + 1, 0), self.config.memory_size)
        held = min(seq_len, window - 1)
        # Per slot: key and value (H * Dh each), position and mask; only the store's slots carry
        # a share.
        per_window_slot = slot_bytes(2 * self.d_model, dtype, share=False)
        per_store_slot = slot_bytes(2 * self.d_model, dtype)
        return stored * per_store_slot + held * per_window_slot + 2 * 8  # + two counters

    def _temperature(self) -> Tensor:
        return self.log_temperature.exp()  # [H]

    def _project(self, x: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unit-length queries and keys (unrotated), values `[B, T, H, Dh]`; positions `[B, T]`."""
        q, k, v, positions = self._split_qkv(x, start)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, positions

    def _forward_call(
        self, x: Tensor, state: RetrievalState | None = None
    ) -> tuple[Tensor, RetrievalState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`: local attention and kNN memory, gated per head.

        Queries go in blocks of `_QUERY_BLOCK`, so the score matrices grow linearly in T.
        """
        state = self._state_or_init(x, state)
        q, k, v, query_pos = self._project(x, state.position)
        context = self._local_context(state, k, v, query_pos)
        candidates = self._candidates(state, k, v)
        gate = torch.sigmoid(self.gate)[:, None]  # [H, 1]
        reads, slots, probs = [], [], []
        for start in range(0, x.shape[1], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            local = self._local_read(q[:, block], query_pos[:, block], context)  # [B, t, H, Dh]
            found_slots, found = self._retrieve(q[:, block], query_pos[:, block], state, candidates)
            found_probs, memory = self._memory_read(q[:, block], found_slots, found, candidates)
            reads.append(gate * memory + (1 - gate) * local)
            slots.append(found_slots)
            probs.append(found_probs)
        y = self.out(torch.cat(reads, dim=1).flatten(2))
        share = self._share(state, candidates, query_pos, torch.cat(slots, 2), torch.cat(probs, 2))
        return y, self._next_state(state, candidates, share, query_pos)

    def _local_context(
        self, state: RetrievalState, k: Tensor, v: Tensor, chunk_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`[window ; chunk]`: rotated keys, values `[B, L+T, H, Dh]`, positions and mask."""
        positions = torch.cat([state.window_positions, chunk_pos], dim=1)
        keys = rotary(torch.cat([state.window_keys, k], dim=1), positions)
        values = torch.cat([state.window_values, v], dim=1)
        fresh = torch.ones_like(chunk_pos, dtype=torch.bool)
        return keys, values, positions, torch.cat([state.window_valid, fresh], dim=1)

    def _local_read(
        self, q: Tensor, query_pos: Tensor, context: tuple[Tensor, Tensor, Tensor, Tensor]
    ) -> Tensor:
        """Causal attention over the context within `local_window`: `[B, t, H, Dh]`."""
        keys, values, key_pos, key_valid = context
        distance = query_pos[:, :, None] - key_pos[:, None, :]  # [B, t, L+T]
        visible = key_valid[:, None, :] & (distance >= 0) & (distance < self.config.local_window)
        scaled_q = rotary(q, query_pos) * self._temperature()[:, None]
        read = F.scaled_dot_product_attention(
            scaled_q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            visible[:, None],
            scale=1.0,
        )  # [B, H, t, Dh]
        return read.transpose(1, 2)

    def _candidates(self, state: RetrievalState, k: Tensor, v: Tensor) -> _Candidates:
        fresh_valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        chunk_pos = chunk_positions(state.position, k.shape[1])
        return _Candidates(
            keys=torch.cat([state.keys, state.window_keys, k], dim=1).detach(),
            values=torch.cat([state.values, state.window_values, v], dim=1).detach(),
            positions=torch.cat([state.positions, state.window_positions, chunk_pos], dim=1),
            stored=state.keys.shape[1],
            fresh_valid=torch.cat([state.window_valid, fresh_valid], dim=1),
        )

    def _retrieve(
        self, q: Tensor, query_pos: Tensor, state: RetrievalState, candidates: _Candidates
    ) -> tuple[Tensor, Tensor]:
        """Candidate slots `[B, H, T, K]` each query's heads retrieve, and which exist.

        A query sees an entry when the entry is among the newest `memory_size` held at its step,
        so fresh tokens can crowd the oldest stored entries out during the call. The index
        searches the stored slots after the last one that may be crowded out (every query sees
        those); an exact masked scan covers the slots before it and the fresh tokens; the two
        top-k lists are merged.
        """
        capacity = self.config.memory_size
        with torch.no_grad():
            fresh_visible, entered = self._fresh_visibility(candidates, query_pos)
            newer = _newer_count(state.valid)  # [B, N]
            crowded = state.valid & (newer + entered[:, -1:] >= capacity)
            width = int(crowded.any(0).nonzero().max()) + 1 if crowded.any() else 0
            stored_visible = state.valid[:, None, :width] & (
                newer[:, None, :width] + entered[:, :, None] < capacity
            )  # [B, T, width]
            visible = torch.cat([stored_visible, fresh_visible], dim=2)  # [B, T, width + C]
            scan_best, scan_slots = self._scan(q, candidates, width, visible)
            index_best, index_slots = self._search_store(
                q, state.keys[:, width:], state.valid[:, width:]
            )
            best, pick = top_k(torch.cat([index_best, scan_best], dim=-1), self.config.top_k)
            slots = torch.cat([index_slots + width, scan_slots], dim=-1)
            slots = slots.gather(-1, pick.clamp(min=0))
            found = best > float("-inf")
        return torch.where(found, slots, 0), found

    def _scan(
        self, q: Tensor, candidates: _Candidates, width: int, visible: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Exact top-k over the store's first `width` slots and the fresh tokens, as seen by
        `visible: [B, T, width + C]`: scores and candidate slots `[B, H, T, K]` (-1: none)."""
        stored = candidates.stored
        keys = torch.cat([candidates.keys[:, :width], candidates.keys[:, stored:]], dim=1)
        scores = torch.einsum("bthd,bshd->bhts", q, keys)  # [B, H, T, width + C]
        scores.masked_fill_(~visible[:, None], float("-inf"))
        best, column = top_k(scores, self.config.top_k)
        return best, torch.where(column < width, column, column - width + stored)

    def _fresh_visibility(
        self, candidates: _Candidates, query_pos: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`[B, T, C]`: fresh tokens each query retrieves from; `[B, T]`: how many have entered."""
        enters_at = candidates.fresh_positions + self.config.local_window  # [B, C]
        entered = candidates.fresh_valid[:, None, :] & (
            enters_at[:, None, :] <= query_pos[:, :, None]
        )  # [B, T, C]
        visible = entered & (_newer_count(entered) < self.config.memory_size)
        return visible, entered.sum(-1)

    def _search_store(self, q: Tensor, keys: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The index's top-k among the `valid` slots of `keys: [B, S, H, Dh]`, per head:
        scores and slots `[B, H, T, K]` (-1: none)."""
        batch, slots, heads, dim = keys.shape
        steps, count = q.shape[1], self.config.top_k
        if slots == 0:
            return q.new_empty(batch, heads, steps, 0), valid.new_empty(
                batch, heads, steps, 0, dtype=torch.long
            )
        grouped_keys = keys.transpose(1, 2).reshape(batch * heads, slots, dim)
        grouped_valid = valid[:, None, :].expand(-1, heads, -1).reshape(batch * heads, slots)
        grouped_q = q.transpose(1, 2).reshape(batch * heads, steps, dim)
        scores, ids = self.index.search(grouped_keys, grouped_valid, grouped_q, count)
        shape = (batch, heads, steps, count)
        return scores.to(q.dtype).view(shape), ids.view(shape)

    def _memory_read(
        self, q: Tensor, slots: Tensor, found: Tensor, candidates: _Candidates
    ) -> tuple[Tensor, Tensor]:
        """Softmax over the retrieved: probabilities `[B, H, T, K]`, read `[B, T, H, Dh]`."""
        keys = _gather_heads(candidates.keys, slots)  # [B, H, T, K, Dh]
        values = _gather_heads(candidates.values, slots)
        scores = torch.einsum("bthd,bhtkd->bhtk", q, keys)
        logits = self._temperature()[:, None, None] * scores
        # A query with nothing to retrieve reads zeros: finite logits, then all-zero weights,
        # so no NaN reaches the gradient.
        logits = logits.masked_fill(~found, float("-inf"))
        logits = logits.masked_fill(~found.any(-1, keepdim=True), 0.0)
        probs = logits.softmax(dim=-1) * found
        return probs, torch.einsum("bhtk,bhtkd->bthd", probs, values)

    def _share(
        self,
        state: RetrievalState,
        candidates: _Candidates,
        query_pos: Tensor,
        slots: Tensor,
        probs: Tensor,
    ) -> Tensor:
        """`[B, N + C]` share of every candidate at the end of the call (zeros at threshold 0).

        The closed form of the per-token rule: an entry's share is the largest of its entry (1)
        and of every retrieval (the head-mean probability), each times `share_decay` per token
        since. A decision statistic, not part of the differentiated computation.
        """
        batch, heads, steps, count = slots.shape
        if not self._tracks_share:
            return candidates.positions.new_zeros(candidates.positions.shape, dtype=probs.dtype)
        decay = self.config.share_decay
        with torch.no_grad():
            end = query_pos[:, -1:] + 1  # [B, 1] the next position
            since_entry = end - candidates.fresh_positions - self.config.local_window  # [B, C]
            entered = candidates.fresh_valid & (since_entry >= 0)
            fresh = torch.where(entered, torch.pow(decay, since_entry.to(probs.dtype)), 0.0)
            prior = torch.cat([decay**steps * state.share, fresh], dim=1)  # [B, N + C]
            # Each (head, rank) retrieval of query t is a pair; a slot's head mean sums its pairs.
            pair_slots = slots.transpose(1, 2).reshape(batch, steps, heads * count)
            pair_probs = probs.detach().transpose(1, 2).reshape(batch, steps, heads * count)
            pair_slots, received = _sum_per_slot(pair_slots, pair_probs / heads)
            ages = torch.arange(steps - 1, -1, -1, device=probs.device).to(probs.dtype)
            weighted = received * torch.pow(decay, ages)[None, :, None]  # [B, T, HK]
            return prior.scatter_reduce(
                1, pair_slots.reshape(batch, -1), weighted.reshape(batch, -1), reduce="amax"
            )

    def _next_state(
        self, state: RetrievalState, candidates: _Candidates, share: Tensor, query_pos: Tensor
    ) -> RetrievalState:
        """Store: the entered candidates narrowed by `_keep`; window: the fresh tokens left."""
        stored = candidates.stored
        end = query_pos[:, -1:] + 1  # [B, 1]
        enters_at = candidates.fresh_positions + self.config.local_window
        fresh_entered = candidates.fresh_valid & (enters_at <= end)
        entered = torch.cat([state.valid, fresh_entered], dim=1)  # [B, N + C]
        keep = self._keep(entered, share)
        slots = {
            "keys": candidates.keys,
            "values": candidates.values,
            "positions": candidates.positions,
            "share": share,
        }
        position = state.position + query_pos.shape[1]
        store = next_cache(keep, entered, slots, position, state.evictions)
        stays = candidates.fresh_valid & ~fresh_entered
        (window_keys, window_values, window_positions), window_valid = compact_slots(
            stays,
            [
                candidates.keys[:, stored:],
                candidates.values[:, stored:],
                candidates.fresh_positions,
            ],
        )
        return RetrievalState(
            **store,
            window_keys=window_keys,
            window_values=window_values,
            window_positions=window_positions,
            window_valid=window_valid,
        )

    def _reference_row(
        self, q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor, row: RetrievalState
    ) -> tuple[Tensor, RetrievalState]:
        """One token at a time, with Python lists of entries."""
        held = _entries(row.keys.detach(), row.values.detach(), row.positions, row.valid, row.share)
        tokens = _entries(
            row.window_keys, row.window_values, row.window_positions, row.window_valid
        )
        tokens += [_Entry(k[t], v[t], p) for t, p in enumerate(query_pos.tolist())]
        gate = torch.sigmoid(self.gate)[:, None]  # [H, 1]
        entering, reads = 0, []
        for t, p in enumerate(query_pos.tolist()):
            entering = self._reference_admit(tokens, entering, held, p)
            visible = held[-self.config.memory_size :]
            memory, received = self._reference_memory_read(q[t], visible)
            local = self._reference_local_read(q[t], p, tokens)
            reads.append(gate * memory + (1 - gate) * local)
            if self._tracks_share:
                for entry in held:
                    entry.share *= self.config.share_decay
                for entry, share in zip(visible, received, strict=True):
                    entry.share = max(entry.share, share)
        entering = self._reference_admit(tokens, entering, held, int(query_pos[-1]) + 1)
        kept = self._reference_kept(held)
        window = [_Entry(e.key.detach(), e.value.detach(), e.position) for e in tokens[entering:]]
        next_row = self._reference_pack(row, kept, window, len(reads), len(held) - len(kept))
        return torch.stack(reads), next_row

    def _reference_admit(
        self, tokens: list[_Entry], entering: int, held: list[_Entry], position: int
    ) -> int:
        """Append to `held` the tokens from `tokens[entering]` on that have left the window of
        the query at `position` (detached, share 1 if tracked); return the next to enter."""
        share, window = (1.0 if self._tracks_share else 0.0), self.config.local_window
        while entering < len(tokens) and tokens[entering].position + window <= position:
            token = tokens[entering]
            held.append(_Entry(token.key.detach(), token.value.detach(), token.position, share))
            entering += 1
        return entering

    def _reference_memory_read(
        self, q_t: Tensor, visible: list[_Entry]
    ) -> tuple[Tensor, list[float]]:
        """Per head: the `top_k` visible entries by inner product, softmax over them.

        Returns the read `[H, Dh]` and each visible entry's head-mean probability.
        """
        received = [0.0] * len(visible)
        if not visible:
            return torch.zeros_like(q_t), received
        keys = torch.stack([e.key for e in visible])  # [n, H, Dh]
        values = torch.stack([e.value for e in visible])
        temperature = self._temperature()
        reads = []
        for h in range(self.n_heads):
            scores = keys[:, h] @ q_t[h]  # [n]
            top = scores.topk(min(self.config.top_k, len(visible))).indices
            probs = (temperature[h] * scores[top]).softmax(dim=0)
            reads.append(probs @ values[top, h])
            for n, p in zip(top.tolist(), probs.tolist(), strict=True):
                received[n] += p / self.n_heads
        return torch.stack(reads), received

    def _reference_local_read(self, q_t: Tensor, p: int, tokens: list[_Entry]) -> Tensor:
        """Softmax attention over the tokens at `p - local_window < s <= p`: `[H, Dh]`."""
        seen = [e for e in tokens if 0 <= p - e.position < self.config.local_window]
        positions = torch.tensor([[e.position for e in seen]], device=q_t.device)
        keys = rotary(torch.stack([e.key for e in seen])[None], positions)[0]  # [n, H, Dh]
        values = torch.stack([e.value for e in seen])
        query = rotary(q_t[None, None], torch.tensor([[p]], device=q_t.device))[0, 0]  # [H, Dh]
        scores = self._temperature()[:, None] * torch.einsum("hd,nhd->hn", query, keys)
        return torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), values)

    def _reference_kept(self, held: list[_Entry]) -> list[_Entry]:
        """The entries that stay in the store, oldest first (`held` is oldest first)."""
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        positions, shares = [e.position for e in held], [e.share for e in held]
        return [held[n] for n in reference_kept(positions, shares, threshold, capacity)]

    def _reference_pack(
        self,
        row: RetrievalState,
        kept: list[_Entry],
        window: list[_Entry],
        steps: int,
        evicted: int,
    ) -> RetrievalState:
        """`row` advanced by `steps` tokens: the kept store entries and the window's tokens."""
        keys, values, positions, valid = _pack(kept, row.keys)
        window_keys, window_values, window_positions, window_valid = _pack(window, row.keys)
        share = torch.tensor([e.share for e in kept], dtype=row.share.dtype)
        return RetrievalState(
            keys=keys,
            values=values,
            positions=positions,
            valid=valid,
            share=share.to(row.share.device)[None],
            window_keys=window_keys,
            window_values=window_values,
            window_positions=window_positions,
            window_valid=window_valid,
            position=row.position + steps,
            evictions=row.evictions + evicted,
        )


def _newer_count(live: Tensor) -> Tensor:
    """`[..., S]` long: how many live slots come after each slot (slots are oldest first)."""
    counts = live.long()
    return counts.flip(-1).cumsum(-1).flip(-1) - counts


def _sum_per_slot(slots: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of `slots, weights: [..., P]`: each slot's total weight in that row.

    Returns the row's slots sorted and, beside each, the total over the pairs of that slot.
    """
    slots, order = slots.sort(dim=-1)
    weights = weights.gather(-1, order)
    starts = torch.ones_like(slots, dtype=torch.bool)
    starts[..., 1:] = slots[..., 1:] != slots[..., :-1]
    run = starts.long().cumsum(-1) - 1  # [..., P] which run of equal slots each pair is in
    totals = torch.zeros_like(weights).scatter_add_(-1, run, weights)
    return slots, totals.gather(-1, run)


def _gather_heads(slots_tensor: Tensor, slots: Tensor) -> Tensor:
    """`slots_tensor: [B, S, H, Dh]` at `slots: [B, H, T, K]` -> `[B, H, T, K, Dh]`."""
    batch, heads, steps, count = slots.shape
    length, dim = slots_tensor.shape[1], slots_tensor.shape[-1]
    rows = slots_tensor.transpose(1, 2).reshape(batch * heads * length, dim)  # (b, h, s) rows
    group = torch.arange(batch * heads, device=slots.device).view(batch, heads, 1, 1)
    picked = rows.index_select(0, (group * length + slots).flatten())
    return picked.view(batch, heads, steps, count, dim)


def _entries(
    keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor, share: Tensor | None = None
) -> list[_Entry]:
    """The live slots of a batch-1 state's tensors as entries, oldest first."""
    live = valid[0].nonzero().squeeze(1).tolist()
    shares = share[0].tolist() if share is not None else [0.0] * valid.shape[1]
    return [_Entry(keys[0, n], values[0, n], int(positions[0, n]), shares[n]) for n in live]


def _pack(entries: list[_Entry], like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys, values `[1, n, H, Dh]`, positions `[1, n]` and an all-True mask from entries."""
    shape = (1, len(entries), *like.shape[2:])
    if entries:
        keys = torch.stack([e.key for e in entries])[None]
        values = torch.stack([e.value for e in entries])[None]
    else:
        keys = like.new_zeros(shape)
        values = like.new_zeros(shape)
    positions = torch.tensor([[e.position for e in entries]], dtype=torch.long, device=like.device)
    valid = torch.ones(1, len(entries), dtype=torch.bool, device=like.device)
    return keys, values, positions.view(1, len(entries)), valid
