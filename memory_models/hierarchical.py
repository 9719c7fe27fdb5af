"""Hierarchical attention: causal attention within a segment plus a bank of segment summaries."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from memory_models.cached_attention import CachedAttentionLayer
from memory_models.common import chunk_positions, require_rotary_heads, rotary
from memory_models.layer import MemoryConfig
from memory_models.segments import open_bytes
from memory_models.slot_cache import (
    compact_slots,
    empty_cache,
    keep_above_threshold,
    keep_largest,
    keep_newest,
    next_cache,
    slot_bytes,
)
from memory_models.state import SlotCacheState


@dataclasses.dataclass
class HierarchicalState(SlotCacheState):
    """The summary bank is the memory `memory_size` sizes (its live slots are `live_entries`);
    the open segment's tokens are the working buffer of the current segment, held in addition."""

    # [B, S, D] layer inputs of the open segment's tokens, slot i at offset i of the segment. Only
    # the first `position % segment_len` slots are live (S is larger in stacked states).
    open_inputs: Tensor
    summaries: Tensor  # [B, M, D] pooled vectors of the closed segments held, oldest first
    segments: Tensor  # [B, M] long: which segment (position // segment_len) each summary pools
    valid: Tensor  # [B, M] bool: live summary slots (padding and evicted slots are False)
    # [B, M]: running max over queries of the head-averaged attention probability each summary
    # got. Only eviction reads it, so it is tracked only when forget_threshold > 0 (else zeros).
    share: Tensor
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: summaries dropped so far (threshold or capacity)


class HierarchicalConfig(MemoryConfig):
    """`memory_size` is the number of segment summaries kept (the document-level memory).

    The sequence is cut into segments of `segment_len` tokens at positions 0, L, 2L, ...; each
    closed segment is pooled into one summary. Besides the summaries, the state holds the layer
    inputs of the open segment's tokens (at most `segment_len - 1`), so it holds at most
    `memory_size` summaries plus `segment_len - 1` token inputs; `live_entries` counts summaries.

    `forget_threshold == 0`: the newest `memory_size` summaries are kept (FIFO). `> 0`: at the end
    of each call, summaries whose attention share (running max over queries of the head-averaged
    probability) is under it are evicted, and if more than `memory_size` remain the lowest-share
    ones go first (ties: the older goes). The newest summary is exempt from both: its share is not
    judged until the next segment's queries have all had their chance to read it (so with
    `memory_size == 1` the threshold never acts).
    """

    kind: Literal["hierarchical"] = "hierarchical"
    threshold_range = (0.05, 0.5)  # attention shares of the summaries
    memory_size: int = Field(default=16, ge=1)
    segment_len: int = Field(default=8, ge=1)
    n_heads: int = Field(default=4, ge=1)
    rope_base: float = Field(default=10000.0, gt=1.0)

    def build(self, d_model: int) -> HierarchicalLayer:
        require_rotary_heads(self.n_heads, d_model)
        return HierarchicalLayer(self, d_model)


class HierarchicalLayer(CachedAttentionLayer):
    """Two-level attention: the word and sentence levels of the Hierarchical Attention Network
    (Yang et al., 2016) turned causal, as in the segment-level recurrent Transformer.

    Word level: a token attends causally to the earlier tokens of its own segment (multi-head
    softmax attention, Vaswani et al., 2017, with rotary positions at the offset within the
    segment, Su et al., 2021). Segments are aligned to absolute positions 0, L, 2L, ..., so any
    split of a stream into calls gives the same segments.

    Pooling (HAN eq. 5-7): when a segment closes, its tokens' layer inputs h_t are pooled,
    u_t = tanh(W h_t + b), alpha_t = softmax_t(u_t . u_w), s = sum_t alpha_t h_t, and the summary s
    is projected to one key and one value per head.

    Document level: a token also attends to the summaries of the segments closed before its own
    segment started, the newest `memory_size` of those held, in the same softmax as its in-segment
    keys, so each head chooses how much to read from its own segment and how much from the
    document (one softmax over `[memory ; segment]`, as segment-recurrent Transformers attend,
    rather than a second softmax and a learned gate; a summary's share is then a probability of
    the same attention, as in `attention.py`). Summary keys carry no rotation (a summary has no
    single position) and are scored against the unrotated query.

    Eviction (see `HierarchicalConfig`): with `forget_threshold == 0` the bank is the newest
    `memory_size` summaries, whatever the calls; otherwise the shares are judged after every
    token (the layer reads one token per call, `CachedAttentionLayer.forward`), so the layer is
    chunk invariant either way. The held summaries and open inputs keep their autograd history;
    a trainer cuts it with `state.detach()`.

    Fast path: the open segment and the chunk are laid out block-aligned (`[B, blocks, L]`), so
    in-segment attention is one batched `L x L` causal attention per touched segment; all segments
    closing in the chunk are pooled at once; each block reads a window of the `memory_size`
    summaries it may see, gathered from the compacted bank.
    """

    state_type = HierarchicalState
    config: HierarchicalConfig

    def __init__(self, config: HierarchicalConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.segment_len = config.segment_len
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.pool_proj = nn.Linear(d_model, d_model)  # W and b of HAN eq. 5
        self.pool_context = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))  # u_w
        self.summary_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> HierarchicalState:
        cache = empty_cache(batch_size, device, dtype)
        segments = cache.pop("positions")  # a summary's place is its segment's index
        return HierarchicalState(
            open_inputs=torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype),
            summaries=torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype),
            segments=segments,
            **cache,
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        held_open = open_bytes(seq_len, self.segment_len, self.d_model, dtype)
        slots = min(seq_len // self.segment_len, self.config.memory_size)
        # Per summary: the pooled vector, its segment index, its mask and its share.
        per_slot = slot_bytes(self.d_model, dtype)
        return held_open + slots * per_slot + 2 * 8  # + position and evictions counters

    def pool(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """HAN attention pooling (eq. 5-7). `inputs: [..., L, D]` -> summary `[..., D]`, weights
        `[..., L]` (they sum to 1 over the segment)."""
        u = torch.tanh(self.pool_proj(inputs))  # [..., L, D]
        weights = (u @ self.pool_context).softmax(dim=-1)  # [..., L]
        return (weights[..., None] * inputs).sum(-2), weights

    def _forward_call(
        self, x: Tensor, state: HierarchicalState | None = None
    ) -> tuple[Tensor, HierarchicalState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, reading the own segment and the summary bank."""
        state = self._state_or_init(x, state)
        opened = state.position % self.segment_len  # [B] tokens of the open segment already seen
        blocks, is_query = self._align(x, state.open_inputs, opened)  # [B, N, D], [B, N]
        n_blocks = blocks.shape[1] // self.segment_len
        closed = (opened + x.shape[1]) // self.segment_len  # [B] blocks that close in this call
        bank = self._candidates(state, blocks, closed)
        window = self._window(state.valid.sum(1), closed, n_blocks, bank.valid.shape[1])
        reads, summary_probs = self._attend(blocks, bank.summaries, window)
        index = chunk_positions(opened, x.shape[1])  # [B, T]: the chunk's slots in `blocks`
        y = self.out(reads.gather(1, index[..., None].expand(-1, -1, self.d_model)))
        share = self._share(bank.share, summary_probs, is_query, window)
        open_inputs = self._open_segment(blocks, opened + x.shape[1])
        return y, self._evict(state, bank, share, open_inputs, x.shape[1])

    def _align(self, x: Tensor, open_inputs: Tensor, opened: Tensor) -> tuple[Tensor, Tensor]:
        """The open segment's inputs then the chunk, laid out from each row's segment start.

        Returns `[B, N, D]` with N a multiple of `segment_len`, so slot i of every row is at offset
        `i % segment_len` of segment `position // segment_len + i // segment_len`; slots after a
        row's tokens are zeros. Also `[B, N]` bool: which slots are this call's tokens.
        """
        steps, length = x.shape[1], self.segment_len
        span = int(opened.max().item()) + steps
        slots = -(-span // length) * length
        held = open_inputs.shape[1]
        i = torch.arange(slots, device=x.device)[None, :]  # [1, N]
        end = opened[:, None] + steps  # [B, 1]
        source = torch.where(i < opened[:, None], i, held + i - opened[:, None])  # [B, N]
        source = source.clamp(max=held + steps - 1)
        stream = torch.cat([open_inputs, x], dim=1)  # [B, S+T, D]
        laid = stream.gather(1, source[..., None].expand(-1, -1, x.shape[2]))
        laid = torch.where((i < end)[..., None], laid, 0.0)
        return laid, (i >= opened[:, None]) & (i < end)

    def _candidates(self, state: HierarchicalState, blocks: Tensor, closed: Tensor) -> _Bank:
        """The bank's live summaries then those of the segments closing here, compacted."""
        batch, slots, dim = blocks.shape
        n_blocks = slots // self.segment_len
        pooled, _ = self.pool(blocks.view(batch, n_blocks, self.segment_len, dim))  # [B, nb, D]
        j = torch.arange(n_blocks, device=blocks.device)
        fresh = j[None, :] < closed[:, None]  # [B, nb]
        first = state.position // self.segment_len
        keep = torch.cat([state.valid, fresh], dim=1)
        # At least one slot, so that the window gather below always has something to index.
        length = max(int(keep.sum(1).max().item()), 1)
        (summaries, segments, share), valid = compact_slots(
            keep,
            [
                torch.cat([state.summaries, pooled], dim=1),
                torch.cat([state.segments, first[:, None] + j[None, :]], dim=1),
                torch.cat([state.share, state.share.new_zeros(batch, n_blocks)], dim=1),
            ],
            length,
        )
        return _Bank(summaries, segments, valid, share)

    def _window(self, held: Tensor, closed: Tensor, n_blocks: int, length: int) -> _Window:
        """The summaries each block may read: indices into the compacted bank.

        Block j sees the `held + j` summaries closed before it (the bank's live ones, then those of
        blocks 0..j-1 of this call), the newest `memory_size` of them. The window is no wider than
        the bank. Blocks after a row's last token have no queries; their window is masked to the
        row's summaries and their reads are dropped.
        """
        width = min(self.config.memory_size, length)
        j = torch.arange(n_blocks, device=held.device)[None, :, None]
        m = torch.arange(width, device=held.device)[None, None, :]
        index = held[:, None, None] + j - width + m  # [B, nb, W]
        seen = (index >= 0) & (index < (held + closed)[:, None, None])
        return _Window(index.clamp(0, length - 1), seen)

    def _project(self, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries (plain and rotated), rotated keys and values, each `[B, nb, L, H, Dh]`.

        Rotation is at the offset within the segment: only in-segment scores use it.
        """
        batch, slots, _ = blocks.shape
        length = self.segment_len
        offsets = (torch.arange(slots, device=blocks.device) % length).expand(batch, slots)
        q, k, v = self.qkv(blocks).view(batch, slots, 3, self.n_heads, self.head_dim).unbind(2)
        base = self.config.rope_base
        q_rot, k = rotary(q, offsets, base), rotary(k, offsets, base)
        shape = (batch, slots // length, length, self.n_heads, self.head_dim)
        return q.reshape(shape), q_rot.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _summary_keys(self, summaries: Tensor, window: _Window) -> tuple[Tensor, Tensor]:
        """Keys and values `[B, nb, W, H, Dh]` of the summaries in each block's window."""
        batch, n_blocks, width = window.index.shape
        kv = self.summary_kv(summaries)  # [B, C, 2D]
        index = window.index.view(batch, -1, 1).expand(-1, -1, kv.shape[2])
        gathered = kv.gather(1, index).view(batch, n_blocks, width, 2, self.n_heads, self.head_dim)
        s_k, s_v = gathered.unbind(3)
        return s_k, s_v

    def _attend(self, blocks: Tensor, summaries: Tensor, window: _Window) -> tuple[Tensor, Tensor]:
        """One softmax per query over its window of summaries and its segment's earlier keys.

        Returns reads `[B, N, D]` and the summary probabilities `[B, H, nb, L, W]`.
        """
        q, q_rot, k, v = self._project(blocks)
        s_k, s_v = self._summary_keys(summaries, window)
        batch, n_blocks, length = q.shape[:3]
        width = window.index.shape[2]
        scale = 1.0 / math.sqrt(self.head_dim)
        to_summary = torch.einsum("bjlhd,bjmhd->bhjlm", q, s_k) * scale
        to_segment = torch.einsum("bjlhd,bjshd->bhjls", q_rot, k) * scale
        causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
        visible = torch.cat(
            [
                window.seen[:, None, :, None, :].expand(-1, 1, -1, length, -1),
                causal.expand(batch, 1, n_blocks, -1, -1),
            ],
            dim=-1,
        )  # [B, 1, nb, L, W+L]
        scores = torch.cat([to_summary, to_segment], dim=-1).masked_fill(~visible, float("-inf"))
        from_summary, from_segment = scores.softmax(dim=-1).split([width, length], dim=-1)
        reads = torch.einsum("bhjlm,bjmhd->bjlhd", from_summary, s_v) + torch.einsum(
            "bhjls,bjshd->bjlhd", from_segment, v
        )
        return reads.reshape(blocks.shape), from_summary

    def _share(
        self, previous: Tensor, summary_probs: Tensor, is_query: Tensor, window: _Window
    ) -> Tensor:
        """`[B, C]`: each bank entry's share, raised to the most any of this call's queries gave it.

        A decision statistic, not part of the differentiated computation, hence no_grad. Only this
        call's tokens count as queries (the open segment's earlier tokens were counted before).
        """
        if not self._tracks_share:
            return previous
        with torch.no_grad():
            batch, length = previous.shape[0], self.segment_len
            n_blocks = window.index.shape[1]
            per_query = summary_probs.mean(1)  # [B, nb, L, W]
            is_query = is_query.view(batch, n_blocks, length, 1)
            received = torch.where(is_query, per_query, 0.0).amax(2)  # [B, nb, W]
            # Unseen window slots land in one spare slot, dropped afterwards.
            target = torch.where(window.seen, window.index, previous.shape[1]).view(batch, -1)
            spare = torch.cat([previous, previous.new_zeros(batch, 1)], dim=1)
            raised = spare.scatter_reduce(1, target, received.view(batch, -1), reduce="amax")
            return raised[:, :-1]

    def _keep(self, valid: Tensor, share: Tensor) -> Tensor:
        """`[B, C]` bool: summaries that stay (candidates are compacted, oldest first). Unlike
        `keep_by_share`, the newest summary is exempt from the threshold and the cap."""
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        if threshold == 0.0:
            return keep_newest(valid, capacity)
        count = valid.sum(1, keepdim=True)
        newest = valid & (torch.arange(valid.shape[1], device=valid.device) == count - 1)
        keep = keep_above_threshold(share, valid, threshold) | newest
        return keep_largest(keep, torch.where(newest, torch.inf, share), capacity)

    def _evict(
        self,
        state: HierarchicalState,
        bank: _Bank,
        share: Tensor,
        open_inputs: Tensor,
        steps: int,
    ) -> HierarchicalState:
        """The next state: the candidates narrowed by `_keep`, compacted oldest first."""
        keep = self._keep(bank.valid, share)
        slots = {"summaries": bank.summaries, "segments": bank.segments, "share": share}
        bank_state = next_cache(keep, bank.valid, slots, state.position + steps, state.evictions)
        return HierarchicalState(open_inputs=open_inputs, **bank_state)

    def _open_segment(self, blocks: Tensor, end: Tensor) -> Tensor:
        """`[B, R, D]`: the inputs of the segment left open after the call's last token."""
        length = self.segment_len
        remaining = end % length  # [B]
        count = int(remaining.max().item())
        i = torch.arange(count, device=blocks.device)[None, :]
        index = ((end - remaining)[:, None] + i).clamp(max=blocks.shape[1] - 1)  # [B, R]
        inputs = blocks.gather(1, index[..., None].expand(-1, -1, blocks.shape[2]))
        return torch.where((i < remaining[:, None])[..., None], inputs, 0.0)

    def _reference_call(
        self, x: Tensor, state: HierarchicalState | None = None
    ) -> tuple[Tensor, HierarchicalState]:
        """One sequence and one token at a time, following the two levels literally."""
        state = self._state_or_init(x, state)
        outputs, rows = [], []
        for b in range(x.shape[0]):
            read, row = self._reference_row(x[b], state.select(torch.tensor([b], device=x.device)))
            outputs.append(read)
            rows.append(row)
        return self.out(torch.stack(outputs)), HierarchicalState.stack(rows)

    def _reference_row(
        self, x: Tensor, state: HierarchicalState
    ) -> tuple[Tensor, HierarchicalState]:
        """One sequence: `x: [T, D]`, `state` of batch 1 -> reads `[T, D]`, next state."""
        length = self.segment_len
        position = int(state.position[0])
        live = state.valid[0]
        held = _ReferenceBank(
            list(state.summaries[0][live]),
            state.segments[0][live].tolist(),
            list(state.share[0][live]),
        )
        segment = list(state.open_inputs[0, : position % length])
        keys, values = self._reference_keys(segment, 0)
        reads = []
        for t in range(x.shape[0]):
            offset = (position + t) % length
            segment.append(x[t])
            key, value = self._reference_keys([x[t]], offset)
            keys, values = keys + key, values + value
            reads.append(self._reference_read(x[t], offset, keys, values, held))
            if offset == length - 1:
                summary, _ = self._reference_pool(segment)
                held.append(summary, (position + t) // length)
                segment, keys, values = [], [], []
        return torch.stack(reads), self._reference_state(state, held, segment, x.shape[0])

    def _reference_keys(self, inputs: list[Tensor], first_offset: int) -> tuple[list, list]:
        """Rotated keys and values `[H, Dh]` of tokens at consecutive offsets of a segment."""
        keys, values = [], []
        for n, h in enumerate(inputs):
            _, k, v = self.qkv(h).view(3, 1, 1, self.n_heads, self.head_dim).unbind(0)
            offset = torch.tensor([[first_offset + n]], device=h.device)
            keys.append(rotary(k, offset, self.config.rope_base)[0, 0])
            values.append(v[0, 0])
        return keys, values

    def _reference_read(
        self, h: Tensor, offset: int, keys: list, values: list, held: _ReferenceBank
    ) -> Tensor:
        """One query: one softmax over the newest `memory_size` held summaries and its segment."""
        q = self.qkv(h)[: self.d_model].view(1, 1, self.n_heads, self.head_dim)
        q_rot = rotary(q, torch.tensor([[offset]], device=h.device), self.config.rope_base)[0, 0]
        seen = list(range(len(held.summaries)))[-self.config.memory_size :]
        scores, reads_from = [], []
        for n in seen:
            s_k, s_v = self.summary_kv(held.summaries[n]).view(2, self.n_heads, self.head_dim)
            scores.append((q[0, 0] * s_k).sum(-1))
            reads_from.append(s_v)
        for k, v in zip(keys, values, strict=True):
            scores.append((q_rot * k).sum(-1))
            reads_from.append(v)
        probs = (torch.stack(scores, dim=-1) / math.sqrt(self.head_dim)).softmax(dim=-1)  # [H, n]
        if self._tracks_share:
            for column, n in enumerate(seen):
                held.share[n] = torch.maximum(held.share[n], probs[:, column].mean().detach())
        read = sum(probs[:, column, None] * v for column, v in enumerate(reads_from))
        return read.flatten()

    def _reference_pool(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """HAN eq. 5-7, token by token: u_t, its score u_t . u_w, softmax, weighted sum."""
        scores = [torch.tanh(self.pool_proj(h)) @ self.pool_context for h in inputs]
        weights = torch.stack(scores).softmax(dim=0)
        return sum(w * h for w, h in zip(weights, inputs, strict=True)), weights

    def _reference_kept(self, held: _ReferenceBank) -> list[int]:
        """Indices of the summaries that stay, oldest first."""
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        count = len(held.summaries)
        if threshold <= 0.0:
            return list(range(count))[-capacity:]
        if count == 0:
            return []
        newest = count - 1
        judged = [n for n in range(newest) if float(held.share[n]) >= threshold]
        if len(judged) >= capacity:
            order = sorted(judged, key=lambda n: (float(held.share[n]), held.segments[n]))
            judged = order[len(order) - (capacity - 1) :]
        return sorted([*judged, newest])

    def _reference_state(
        self, state: HierarchicalState, held: _ReferenceBank, segment: list[Tensor], steps: int
    ) -> HierarchicalState:
        """The row's next state: the kept summaries, oldest first, and the open segment."""
        kept = self._reference_kept(held)
        device, dtype = state.position.device, state.summaries.dtype

        def batch_of_one(items: list[Tensor], *tail: int) -> Tensor:
            if not items:
                return torch.zeros(1, 0, *tail, device=device, dtype=dtype)
            return torch.stack(items)[None]

        segments = [held.segments[n] for n in kept]
        return HierarchicalState(
            open_inputs=batch_of_one(segment, self.d_model),
            summaries=batch_of_one([held.summaries[n] for n in kept], self.d_model),
            segments=torch.tensor(segments, dtype=torch.long, device=device).view(1, -1),
            valid=torch.ones(1, len(kept), dtype=torch.bool, device=device),
            share=batch_of_one([held.share[n] for n in kept]),
            position=state.position + steps,
            evictions=state.evictions + len(held.summaries) - len(kept),
        )


@dataclasses.dataclass
class _Bank:
    """Summary candidates of one call, compacted: live ones first, oldest first."""

    summaries: Tensor  # [B, C, D]
    segments: Tensor  # [B, C] long
    valid: Tensor  # [B, C] bool
    share: Tensor  # [B, C]


@dataclasses.dataclass
class _Window:
    """For each block, the bank slots its queries may read."""

    index: Tensor  # [B, nb, W] long: slots of the compacted bank, oldest first
    seen: Tensor  # [B, nb, W] bool: whether the slot is really visible (else padding)


@dataclasses.dataclass
class _ReferenceBank:
    """The summaries one sequence holds during `reference_forward`, oldest first."""

    summaries: list[Tensor]
    segments: list[int]
    share: list[Tensor]

    def append(self, summary: Tensor, segment: int) -> None:
        self.summaries.append(summary)
        self.segments.append(segment)
        self.share.append(summary.new_zeros(()).detach())
