"""Reformer LSH attention: shared-QK, multi-round angular hashing, sorted chunks, with a cache."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.cached_attention import CachedAttentionLayer
from memory_models.common import chunk_positions, merge_heads, require_rotary_heads, rotary
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
class ReformerState(SlotCacheState):
    keys: Tensor  # [B, L, H, Dh] unit-length shared-QK keys, rotated at their positions
    values: Tensor  # [B, L, H, Dh]
    buckets: Tensor  # [B, L, H, R] long: each entry's bucket in every hash round
    positions: Tensor  # [B, L] long: absolute position of each cached token
    valid: Tensor  # [B, L] bool: live slots (padding and evicted slots are False)
    # [B, L]: running max over queries of the head-averaged attention weight each entry got.
    # Only eviction reads it, so it is tracked only when forget_threshold > 0 (zeros otherwise).
    share: Tensor
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: cache entries dropped so far (capacity or threshold)


class ReformerConfig(MemoryConfig):
    """`memory_size` is the number of cached positions a stream keeps between calls, and the
    reach of every query: it sees only among the newest `memory_size` items held at its step.

    Each call attends over `[cache ; chunk]` (the rule is in `ReformerLayer`); cache entries are
    keys only. With `forget_threshold == 0` the cache keeps the newest `memory_size` entries of
    `[cache ; chunk]`, so each query's candidates are its last `memory_size` tokens. With
    `forget_threshold > 0`, entries whose attention share (running max over queries of the
    head-averaged weight, rounds combined) is under it are evicted after each token, and if
    more than `memory_size` remain, the lowest-share ones go first (ties: newest kept).

    `n_hashes` rounds of hashing into `n_buckets` (even) buckets; `chunk_len` is the length of the
    sorted chunks; `hash_seed` draws the random rotations, which are saved with the weights.
    """

    kind: Literal["reformer"] = "reformer"
    threshold_range = (0.01, 0.5)  # attention shares
    memory_size: int = Field(default=64, ge=1)
    n_heads: int = Field(default=4, ge=1)
    n_hashes: int = Field(default=2, ge=1)
    n_buckets: int = Field(default=8, ge=2)
    chunk_len: int = Field(default=16, ge=1)
    hash_seed: int = Field(default=0, ge=0)
    rope_base: float = Field(default=10000.0, gt=1.0)

    @field_validator("n_buckets")
    @classmethod
    def _even_buckets(cls, n_buckets: int) -> int:
        if n_buckets % 2:
            raise ValueError(
                f"n_buckets={n_buckets} must be even: the hash is argmax([xR; -xR]) over "
                "n_buckets / 2 random directions"
            )
        return n_buckets

    def build(self, d_model: int) -> ReformerLayer:
        require_rotary_heads(self.n_heads, d_model)
        return ReformerLayer(self, d_model)


def lsh_buckets(x: Tensor, rotations: Tensor) -> Tensor:
    """Angular LSH (Kitaev et al., 2020, section 2): `h(x) = argmax([xR ; -xR])` per round.

    `x: [..., Dh]`, `rotations: [R, Dh, n_buckets / 2]` -> `[..., R]` long in `[0, n_buckets)`.
    Only the direction of x matters: a positive multiple of x lands in the same buckets.
    """
    projected = torch.einsum("...d,rdn->...rn", x.detach(), rotations.to(x.dtype))
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


@dataclasses.dataclass
class _Items:
    """One call's attention items, `[cache ; chunk]` reordered dead slots first: N = L + T.

    Live items are then contiguous, in position order, and the chunk's tokens are the last T.
    """

    queries: Tensor  # [B, N, H, Dh] zeros for cache entries, which are keys only
    keys: Tensor  # [B, N, H, Dh]
    values: Tensor  # [B, N, H, Dh]
    buckets: Tensor  # [B, N, H, R] long
    positions: Tensor  # [B, N] long
    valid: Tensor  # [B, N] bool
    share: Tensor  # [B, N] share held so far (0 for the chunk's tokens)


@dataclasses.dataclass
class _Reads:
    """The chunk's queries after LSH attention, every head and round."""

    reads: Tensor  # [B, H, R, T, Dh] each round's attention output
    lse: Tensor  # [B, H, R, T] each round's log-sum-exp of the visible scores
    # Only where eviction reads shares: the weights over each query's look-back window and the
    # item index of each window slot (-1: none), both [B, H, R, T, 3m].
    probs: Tensor | None = None
    key_items: Tensor | None = None


class ReformerLayer(CachedAttentionLayer):
    """Causal LSH attention of the Reformer (Kitaev et al., 2020, section 2), with rotary
    positions (Su et al., 2021) and a bounded cache for streaming.

    Shared-QK: one projection gives the queries q; the keys are the unit vectors q / |q|. Each of
    `n_hashes` rounds r hashes the unrotated shared vector with fixed random rotations R_r
    (`lsh_buckets`); scores are `q_i . k_j / sqrt(Dh)` with both rotated at their positions, so
    buckets come from content and scores see relative position. A cache entry keeps its buckets,
    since a rotated key cannot be hashed again.

    Which keys a query sees. The paper sorts the whole sequence by (bucket, position), cuts the
    sorted order into chunks of m = `chunk_len` and lets each query attend to the earlier
    same-bucket items of its chunk and of the chunk before. Sorting the whole sequence lets a
    later token move an earlier query's chunk boundaries (a later token hashed into a lower
    bucket shifts every rank above it), so the query's keys would depend on the future. Here each
    query applies that rule to the sequence it has seen: its prefix P_i, the newest `memory_size`
    items held at its step (live cache entries and the chunk's earlier tokens) plus itself.
    With ranks s from sorting P_i by (bucket, position) in round r, query i sees j in P_i iff

        bucket_r(j) == bucket_r(i),  position(j) < position(i),  s_j // m >= s_i // m - 1,

    and sees itself alone when no j qualifies (section 2: no attention to oneself unless there
    is nothing else). Equivalently, it sees the c_i newest earlier items of its bucket, with
    c_i = min(a_i, m + (o_i + a_i) mod m), where P_i holds a_i earlier items of i's bucket and o_i
    items of lower buckets: the fast path's form. A round gives o_i^r (softmax over what it
    sees) and its log-sum-exp z_i^r; rounds combine as o_i = sum_r exp(z_i^r - logsumexp_r z_i^r)
    o_i^r ("multi-round LSH attention"); a key found by several rounds counts once per round (the
    paper's duplicate correction is not applied).

    With `forget_threshold == 0` the cache holds the last `memory_size` tokens, so P_i is the last
    `memory_size` tokens and i: a sliding window, LSH-sparse inside, and the layer is chunk
    invariant. With `forget_threshold > 0` eviction (see `ReformerConfig`) reads the queries'
    shares, so it is judged after every token: the layer reads one token per call
    (`CachedAttentionLayer.forward`) and stays chunk invariant. Cached keys and values keep their
    autograd history; a trainer cuts it with `state.detach()`.

    Fast path: per head and round one argsort by (bucket, position). Query i's c_i keys are the
    c_i sorted slots just before it (a bucket's items are contiguous there) and c_i < 2m, so each
    sorted chunk of m queries attends to itself and the two chunks before it: time and memory
    linear in the call's length.
    """

    state_type = ReformerState
    config: ReformerConfig

    def __init__(self, config: ReformerConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.shared_qk = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        # Fixed per layer and saved in the state dict, so a checkpoint reloads the same hashes.
        generator = torch.Generator().manual_seed(config.hash_seed)
        shape = (config.n_hashes, self.head_dim, config.n_buckets // 2)
        self.register_buffer("rotations", torch.randn(shape, generator=generator))

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> ReformerState:
        rounds = (batch_size, 0, self.n_heads, self.config.n_hashes)
        return ReformerState(
            buckets=torch.zeros(rounds, dtype=torch.long, device=device),
            **empty_cache(batch_size, device, dtype, (self.n_heads, self.head_dim)),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        slots = min(seq_len, self.config.memory_size)
        # Per slot: key and value (H * Dh each), buckets (H * R longs), position, mask and share.
        buckets = self.n_heads * self.config.n_hashes * 8
        per_slot = slot_bytes(2 * self.d_model, dtype) + buckets
        return slots * per_slot + 2 * 8  # + position and evictions counters

    def _project(self, x: Tensor, start: Tensor) -> _Items:
        """The chunk's items: rotated queries and unit keys, values, buckets, positions."""
        batch, steps, _ = x.shape
        positions = chunk_positions(start, steps)  # [B, T]
        qk = self.shared_qk(x).view(batch, steps, self.n_heads, self.head_dim)
        base = self.config.rope_base
        return _Items(
            queries=rotary(qk, positions, base),
            keys=rotary(F.normalize(qk, dim=-1), positions, base),
            values=self.value(x).view(batch, steps, self.n_heads, self.head_dim),
            buckets=lsh_buckets(qk, self.rotations),  # [B, T, H, R]
            positions=positions,
            valid=torch.ones(batch, steps, dtype=torch.bool, device=x.device),
            share=x.new_zeros(batch, steps),
        )

    def _forward_call(
        self, x: Tensor, state: ReformerState | None = None
    ) -> tuple[Tensor, ReformerState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, attending over `[cache ; chunk]` by the LSH rule."""
        state = self._state_or_init(x, state)
        items = _join(state, self._project(x, state.position))
        reads = self._lsh_attention(items, x.shape[1])
        weights = reads.lse.softmax(dim=2)  # [B, H, R, T]: the rounds' weights
        read = (weights[..., None] * reads.reads).sum(2)  # [B, H, T, Dh]
        y = self.out(merge_heads(read))
        share = self._share(items.share, reads, weights)
        return y, self._evict(state, items, share)

    def _reach(self, items: _Items) -> Tensor:
        """`[B, H, R, N]` long: c_i, how many of its bucket's newest earlier items i sees.

        Counts over P_i (items i - memory_size .. i; dead items count nothing) come from one
        cumulative sum of one-hot buckets along the items.
        """
        m, window = self.config.chunk_len, self.config.memory_size
        live = items.valid[:, :, None, None]  # [B, N, 1, 1]
        onehot = F.one_hot(items.buckets, self.config.n_buckets) * live[..., None]
        running = F.pad(onehot.cumsum(1), (0, 0, 0, 0, 0, 0, 1, 0))  # [B, N+1, H, R, nb]
        end = torch.arange(1, items.valid.shape[1] + 1, device=live.device)
        counts = running[:, end] - running[:, (end - 1 - window).clamp(min=0)]  # P_i's buckets
        own = items.buckets[..., None]
        earlier = counts.gather(-1, own)[..., 0] - 1  # a_i
        lower = (counts.cumsum(-1) - counts).gather(-1, own)[..., 0]  # o_i
        reach = torch.minimum(earlier, m + (lower + earlier) % m)
        return torch.where(live, reach, 0).permute(0, 2, 3, 1)

    def _lsh_attention(self, items: _Items, steps: int) -> _Reads:
        """Every head and round: sort, attend to the reach just before each query, and return
        what the chunk's queries (the last `steps` items) read.

        The sorted order is padded to whole chunks; padding and dead items sort last and reach
        nothing, so they only ever see themselves, and no live query reaches them.
        """
        m, total = self.config.chunk_len, items.valid.shape[1]
        order = self._sort_order(items)  # [B, H, R, N]
        padded = -(-total // m) * m
        chunks = (*order.shape[:3], padded // m, m)  # [B, H, R, C, m]

        def sorted_chunks(t: Tensor, fill: float) -> Tensor:  # -> [B, H, R, C, m, ...]
            return _pad_dim(t, 3, padded - total, fill).view(*chunks, *t.shape[4:])

        q, k, v = (
            sorted_chunks(_to_sorted(t, order), 0.0)
            for t in (items.queries, items.keys, items.values)
        )
        reach = sorted_chunks(self._reach(items).gather(3, order), 0)  # [B, H, R, C, m]
        reads, lse, probs = self._attend_in_chunks(q, k, v, reach)
        # Where each of the chunk's queries sits in sorted order.
        slots = order.argsort(dim=-1)[..., total - steps :]  # [B, H, R, T]
        result = _Reads(reads=_gather_rows(reads, slots), lse=lse.gather(3, slots))
        if self._tracks_share:
            key_items = _look_back(sorted_chunks(order, -1), -1)  # [B, H, R, C, 3m]
            windows = key_items[..., None, :].expand(*chunks, 3 * m).flatten(3, 4)
            result.probs = _gather_rows(probs.detach(), slots)
            result.key_items = _gather_rows(windows, slots)
        return result

    def _attend_in_chunks(
        self, q: Tensor, k: Tensor, v: Tensor, reach: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sorted chunks `q, k, v: [B, H, R, C, m, Dh]`, `reach: [B, H, R, C, m]` -> each sorted
        query's read `[B, H, R, Np, Dh]`, log-sum-exp `[B, H, R, Np]` and weights over its
        window (its chunk and the two before) `[B, H, R, Np, 3m]`."""
        m = q.shape[4]
        scores = torch.einsum("bhrcid,bhrcjd->bhrcij", q, _look_back(k, 0.0))
        scores = scores / math.sqrt(self.head_dim)  # [B, H, R, C, m, 3m]
        # Query row i of a chunk sits 2m + i - j sorted slots after window slot j.
        row, slot = torch.arange(m, device=q.device), torch.arange(3 * m, device=q.device)
        back = 2 * m + row[:, None] - slot[None, :]  # [m, 3m]
        reach = reach[..., None]
        visible = ((back >= 1) & (back <= reach)) | ((back == 0) & (reach == 0))
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = scores.logsumexp(dim=-1)  # every row sees at least itself
        probs = (scores - lse[..., None]).exp()
        reads = torch.einsum("bhrcij,bhrcjd->bhrcid", probs, _look_back(v, 0.0))
        return reads.flatten(3, 4), lse.flatten(3), probs.flatten(3, 4)

    def _sort_order(self, items: _Items) -> Tensor:
        """`[B, H, R, N]`: item indices sorted by (bucket, position), dead items last.

        Live items are in position order along N, so the item index breaks ties by position.
        """
        count = items.valid.shape[1]
        dead = torch.full_like(items.buckets, self.config.n_buckets)
        buckets = torch.where(items.valid[:, :, None, None], items.buckets, dead)
        index = torch.arange(count, device=buckets.device)
        return (buckets.permute(0, 2, 3, 1) * count + index).argsort(dim=-1)

    def _share(self, previous: Tensor, reads: _Reads, weights: Tensor) -> Tensor:
        """`[B, N]`: each item's share, raised to the most any of this chunk's queries gave it.

        The weight query i gives item j is j's coefficient in i's output: the sum over rounds of
        the round's weight times j's probability there, averaged over heads. A decision statistic,
        not differentiated, and computed only when eviction reads it.
        """
        if not self._tracks_share:
            return previous
        with torch.no_grad():
            given = reads.probs * weights[..., None] / self.n_heads  # [B, H, R, T, 3m]

            def per_query(t: Tensor) -> Tensor:  # [B, H, R, T, 3m] -> [B, T, H*R*3m]
                return t.permute(0, 3, 1, 2, 4).flatten(2)

            return _max_total_weight(previous, per_query(reads.key_items), per_query(given))

    def _evict(self, state: ReformerState, items: _Items, share: Tensor) -> ReformerState:
        """The next cache: the items narrowed by `_keep`, compacted oldest first."""
        steps = items.valid.shape[1] - state.valid.shape[1]
        keep = self._keep(items.valid, share)
        slots = {
            "keys": items.keys,
            "values": items.values,
            "buckets": items.buckets,
            "positions": items.positions,
            "share": share,
        }
        position = state.position + steps
        return ReformerState(**next_cache(keep, items.valid, slots, position, state.evictions))

    def _reference_call(
        self, x: Tensor, state: ReformerState | None = None
    ) -> tuple[Tensor, ReformerState]:
        """One sequence, one query, one head and one round at a time: sort the query's prefix,
        list the items it sees by the paper's chunk rule, softmax, combine rounds."""
        state = self._state_or_init(x, state)
        chunk = self._project(x, state.position)
        outputs, rows = [], []
        for b in range(x.shape[0]):
            cache = state.select(torch.tensor([b], device=x.device))
            read, row_state = self._reference_row(chunk, b, cache)
            outputs.append(read)
            rows.append(row_state)
        y = self.out(torch.stack(outputs).flatten(2))
        return y, ReformerState.stack(rows)

    def _reference_row(
        self, chunk: _Items, b: int, cache: ReformerState
    ) -> tuple[Tensor, ReformerState]:
        """Sequence b of the chunk with its cache (batch 1) -> reads `[T, H, Dh]`, next cache."""
        steps = chunk.valid.shape[1]
        fresh = {"keys": chunk.keys[b], "values": chunk.values[b], "buckets": chunk.buckets[b]}
        entries, key_pos = live_then_chunk(cache, fresh, chunk.positions[b])
        keys, values, share = entries["keys"], entries["values"], entries["share"]  # oldest first
        bucket_ids = entries["buckets"].tolist()  # [N, H, R]
        first_query, window = len(key_pos) - steps, self.config.memory_size
        reads = []
        for t, query in enumerate(chunk.queries[b]):
            i = first_query + t
            prefix = [*range(max(0, i - window), i), i]  # the newest memory_size held, and i
            visible = [
                [
                    self._reference_visible(i, prefix, bucket_ids, key_pos, h, r)
                    for r in range(self.config.n_hashes)
                ]
                for h in range(self.n_heads)
            ]
            read, given = self._reference_query(query, keys, values, visible)
            reads.append(read)
            if self._tracks_share:
                share = torch.maximum(share, given)
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        kept = reference_kept(key_pos, share.tolist(), threshold, capacity)
        row = kept_rows(
            kept, {**entries, "share": share}, key_pos, cache.position + steps, cache.evictions
        )
        return torch.stack(reads), ReformerState(**row)

    def _reference_visible(
        self,
        i: int,
        prefix: list[int],
        buckets: list[list[list[int]]],
        key_pos: list[int],
        h: int,
        r: int,
    ) -> list[int]:
        """Items query i sees in round r of head h: sort its prefix by (bucket, position); then
        the earlier items of its bucket in its sorted chunk or the one before, else itself."""
        m = self.config.chunk_len
        ranked = sorted(prefix, key=lambda n: (buckets[n][h][r], key_pos[n]))
        rank = {n: s for s, n in enumerate(ranked)}
        chunk = rank[i] // m
        seen = [
            j
            for j in prefix
            if buckets[j][h][r] == buckets[i][h][r]
            and key_pos[j] < key_pos[i]
            and chunk - 1 <= rank[j] // m <= chunk
        ]
        return seen or [i]

    def _reference_query(
        self, query: Tensor, keys: Tensor, values: Tensor, visible: list[list[list[int]]]
    ) -> tuple[Tensor, Tensor]:
        """`query: [H, Dh]` -> read `[H, Dh]` and the head-averaged weight each item got `[N]`."""
        heads, given = [], keys.new_zeros(keys.shape[0])
        for h, rounds in enumerate(visible):
            outs, lses, probs = [], [], []
            for seen in rounds:
                scores = keys[seen, h] @ query[h] / math.sqrt(self.head_dim)  # [n]
                lse = scores.logsumexp(dim=0)
                probs.append((scores - lse).exp())
                outs.append(probs[-1] @ values[seen, h])
                lses.append(lse)
            weights = torch.stack(lses).softmax(dim=0)  # [R]
            heads.append(sum(w * out for w, out in zip(weights, outs, strict=True)))
            for seen, w, p in zip(rounds, weights, probs, strict=True):
                index = torch.tensor(seen, device=keys.device)
                given = given.index_add(0, index, (w * p).detach() / self.n_heads)
        return torch.stack(heads), given


def _join(state: ReformerState, chunk: _Items) -> _Items:
    """`[cache ; chunk]` along the item dim, dead cache slots moved to the front.

    Cache entries get zero queries (they are keys only). Live items keep their order, so they are
    contiguous, oldest first, and the chunk's tokens stay last.
    """
    valid = torch.cat([state.valid, chunk.valid], dim=1)  # [B, N]
    order = valid.long().argsort(dim=1, stable=True)

    def joined(cached: Tensor, fresh: Tensor) -> Tensor:
        both = torch.cat([cached, fresh], dim=1)
        index = order.view(*order.shape, *([1] * (both.dim() - 2))).expand_as(both)
        return both.gather(1, index)

    return _Items(
        queries=joined(torch.zeros_like(state.keys), chunk.queries),
        keys=joined(state.keys, chunk.keys),
        values=joined(state.values, chunk.values),
        buckets=joined(state.buckets, chunk.buckets),
        positions=joined(state.positions, chunk.positions),
        valid=joined(state.valid, chunk.valid),
        share=joined(state.share, chunk.share),
    )


def _to_sorted(t: Tensor, order: Tensor) -> Tensor:
    """Item-major `t: [B, N, H, ...]` -> `[B, H, R, N, ...]`, rows in each round's `order`."""
    batch, count, heads, *rest = t.shape
    rows = t.transpose(1, 2)[:, :, None].expand(batch, heads, order.shape[2], count, *rest)
    index = order.view(*order.shape, *([1] * len(rest))).expand(*order.shape, *rest)
    return rows.gather(3, index)


def _pad_dim(t: Tensor, dim: int, count: int, fill: float) -> Tensor:
    """`count` slots of `fill` appended along `dim`."""
    if count == 0:
        return t
    shape = list(t.shape)
    shape[dim] = count
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def _look_back(t: Tensor, fill: float) -> Tensor:
    """`[B, H, R, C, m, ...]` -> `[B, H, R, C, 3m, ...]`: each chunk behind the two before it.

    Before the first chunk there is nothing: slots of `fill` (the look-back does not wrap).
    """
    front = t.new_full((*t.shape[:3], 2, *t.shape[4:]), fill)
    earlier = torch.cat([front, t], dim=3)  # [B, H, R, C+2, m, ...]
    return torch.cat([earlier[:, :, :, :-2], earlier[:, :, :, 1:-1], t], dim=4)


def _gather_rows(t: Tensor, slots: Tensor) -> Tensor:
    """`t: [B, H, R, Np, X]`, `slots: [B, H, R, T]` -> the rows at `slots`, `[B, H, R, T, X]`."""
    return t.gather(3, slots[..., None].expand(*slots.shape, t.shape[-1]))


def _max_total_weight(previous: Tensor, items: Tensor, given: Tensor) -> Tensor:
    """Each item's largest total weight from one query, raised to at least `previous: [B, N]`.

    `items, given: [B, T, K]`: per query, (item, weight) pairs in which an item may appear more
    than once (several heads and rounds). Pairs are sorted by item within each query, summed per
    run of equal items, then scattered with a max: linear in T, no `[T, N]` matrix.
    """
    items = torch.where(given > 0, items, 0)  # slots with no weight point at item 0, adding 0
    items, order = items.sort(dim=-1)
    given = given.gather(-1, order)
    changed = (items[..., 1:] != items[..., :-1]).long()
    run = torch.cat([torch.zeros_like(items[..., :1]), changed], -1).cumsum(-1)  # [B, T, K]
    totals = torch.zeros_like(given).scatter_add(-1, run, given)
    owners = torch.zeros_like(items).scatter(-1, run, items)  # unused runs: item 0, weight 0
    return previous.scatter_reduce(1, owners.flatten(1), totals.flatten(1), "amax")
