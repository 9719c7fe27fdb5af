"""Transformer-XL segment recurrence as a memory layer (Dai et al., 2019)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from memory_models.common import chunk_positions
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.segments import in_segments, open_bytes
from memory_models.slot_cache import (
    empty_cache,
    keep_above_threshold,
    keep_newest,
    next_cache,
    rows_to_slots,
    slot_bytes,
)
from memory_models.state import SlotCacheState


@dataclasses.dataclass
class TransformerXLState(SlotCacheState):
    memory: Tensor  # [B, M, D] layer inputs of the cached tokens, detached
    positions: Tensor  # [B, M] long: absolute position of each cached token
    valid: Tensor  # [B, M] bool: live slots (padding and evicted slots are False)
    share: Tensor  # [B, M] attention share each cached token got in the chunk that kept it
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: cache entries dropped so far (threshold or capacity)
    open_inputs: Tensor  # [B, P, D] layer inputs of the open segment (`position % segment_len`)


class TransformerXLConfig(MemoryConfig):
    """`memory_size` is mem_len: how many past tokens' layer inputs the cache holds.

    `segment_len` is the segment (the paper's tgt_len): the stream is read in segments at
    positions 0, S, 2S, ..., whatever the calls, and the cache is written when a segment closes.

    `forget_threshold`: when a segment closes, cache candidates (old entries and the segment's
    tokens) whose attention share (max over the segment's queries of the head-averaged attention
    probability) is under it are dropped before the newest `memory_size` are kept. 0 gives the
    paper's FIFO cache.
    """

    kind: Literal["transformer_xl"] = "transformer_xl"
    threshold_range = (0.05, 0.5)  # attention shares
    memory_size: int = Field(default=32, ge=1)
    n_heads: int = Field(default=4, ge=1)
    segment_len: int = Field(default=32, ge=1)

    def build(self, d_model: int) -> TransformerXLLayer:
        return TransformerXLLayer(self, d_model)


def sinusoid(distance: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Sinusoidal embedding R of relative distances, `distance: [...]` long -> `[..., dim]`."""
    steps = torch.arange(0, dim, 2, device=distance.device, dtype=dtype)
    inv_freq = 1.0 / (10000.0 ** (steps / dim))  # [dim / 2]
    angles = distance.to(dtype)[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TransformerXLLayer(MemoryLayer):
    """Transformer-XL attention with segment-level recurrence (Dai et al., 2019).

    Each segment attends from its tokens over `[memory ; segment]`: every live memory entry is
    visible, the segment itself is causal. The memory holds the layer *inputs* of the last
    `memory_size` tokens, detached, so gradients stop at the segment boundary as in the paper.
    Scores use the paper's relative positions: `(q_i + u)·k_j + (q_i + v)·W_r R_{i-j}`, scaled by
    `1/sqrt(Dh)`.

    `memory_size` is the cache length (mem_len). `forget_threshold > 0` evicts cache candidates
    whose attention share in the chunk (max over queries of the head-averaged probability) is under
    it, before the newest `memory_size` are kept; the cache can then hold holes in position, so
    every entry stores its absolute position and distances are `pos_q - pos_k`.

    Fast path: one batched attention per chunk; the position term is computed once per distinct
    distance in the chunk and gathered (instead of the paper's rel-shift, which assumes a gapless
    cache). Segments are aligned to absolute positions and the open one's inputs are kept in the
    state (`memory_models.segments`), so any cut of a stream into calls gives the whole pass.
    """

    state_type = TransformerXLState
    config: TransformerXLConfig

    def __init__(self, config: TransformerXLConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        heads = config.n_heads
        # Round up so any d_model works with any head count.
        self.head_dim = -(-d_model // heads)
        inner = heads * self.head_dim
        self.pos_dim = d_model + d_model % 2  # sin/cos pairs need an even width
        self.query = nn.Linear(d_model, inner, bias=False)
        self.key = nn.Linear(d_model, inner, bias=False)
        self.value = nn.Linear(d_model, inner, bias=False)
        self.pos_proj = nn.Linear(self.pos_dim, inner, bias=False)  # W_r
        self.content_bias = nn.Parameter(0.02 * torch.randn(heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(0.02 * torch.randn(heads, self.head_dim))  # v
        self.out = nn.Linear(inner, d_model)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> TransformerXLState:
        return TransformerXLState(
            memory=torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype),
            **empty_cache(batch_size, device, dtype),
            open_inputs=torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        segment = self.config.segment_len
        slots = min(seq_len - seq_len % segment, self.config.memory_size)
        # Per slot: the cached input, its position, its mask and its share.
        held = slots * slot_bytes(self.d_model, dtype) + 2 * 8  # + the two counters
        return held + open_bytes(seq_len, segment, self.d_model, dtype)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(*t.shape[:-1], self.config.n_heads, self.head_dim)  # [B, L, H, Dh]

    def forward(
        self, x: Tensor, state: TransformerXLState | None = None
    ) -> tuple[Tensor, TransformerXLState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, segment by segment."""
        state = self._state_or_init(x, state)
        return in_segments(self._segment, x, state, self.config.segment_len)

    def _segment(
        self, x: Tensor, state: TransformerXLState, closes: bool
    ) -> tuple[Tensor, TransformerXLState | None]:
        """One segment's tokens (or its open part) attending over `[memory ; x]`."""
        context, key_pos, key_valid, query_pos = self._context(x, state)
        q = self._heads(self.query(x))  # [B, T, H, Dh]
        k = self._heads(self.key(context))  # [B, L, H, Dh]
        v = self._heads(self.value(context))  # [B, L, H, Dh]
        distance = query_pos[:, :, None] - key_pos[:, None, :]  # [B, T, L]
        visible = key_valid[:, None, :] & (distance >= 0)  # [B, T, L]
        probs = self._attention(q, k, distance, visible)  # [B, H, T, L]
        read = torch.einsum("bhtl,blhd->bthd", probs, v).flatten(2)  # [B, T, H*Dh]
        if not closes:
            return self.out(read), None
        share = probs.mean(1).amax(1)  # [B, L]
        return self.out(read), self._update_memory(state, context, key_pos, key_valid, share)

    def _context(self, x: Tensor, state: TransformerXLState) -> tuple[Tensor, ...]:
        """Keys' inputs `[memory ; x]` with their positions and mask, and the queries' positions."""
        batch, steps, _ = x.shape
        query_pos = chunk_positions(state.position, steps)  # [B, T]
        context = torch.cat([state.memory, x], dim=1)  # [B, L, D]
        key_pos = torch.cat([state.positions, query_pos], dim=1)  # [B, L]
        fresh = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
        key_valid = torch.cat([state.valid, fresh], dim=1)  # [B, L]
        return context, key_pos, key_valid, query_pos

    def _attention(self, q: Tensor, k: Tensor, distance: Tensor, visible: Tensor) -> Tensor:
        content = torch.einsum("bthd,blhd->bhtl", q + self.content_bias, k)  # [B, H, T, L]
        position = self._position_scores(q, torch.where(visible, distance, 0))
        scores = (content + position) / math.sqrt(self.head_dim)
        # Every query sees at least itself, so no row is all -inf.
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        return scores.softmax(dim=-1)

    def _position_scores(self, q: Tensor, distance: Tensor) -> Tensor:
        """`(q + v)·W_r R_d` for each pair's distance `d`: computed per distinct d, then gathered.

        Gathering by the stored distance (not the rel-shift trick) stays right when evictions leave
        holes in the cache's positions.
        """
        distinct, index = torch.unique(distance, return_inverse=True)  # [U], [B, T, L]
        rel = self._heads(self.pos_proj(sinusoid(distinct, self.pos_dim, q.dtype)))  # [U, H, Dh]
        per_distance = torch.einsum("bthd,uhd->bhtu", q + self.position_bias, rel)  # [B, H, T, U]
        index = index[:, None].expand(-1, per_distance.shape[1], -1, -1)  # [B, H, T, L]
        return per_distance.gather(-1, index)

    def _update_memory(
        self,
        state: TransformerXLState,
        context: Tensor,
        key_pos: Tensor,
        key_valid: Tensor,
        share: Tensor,
    ) -> TransformerXLState:
        """Cache = `[memory ; chunk]`, minus low-share entries, then the newest `memory_size`."""
        keep = keep_above_threshold(share, key_valid, self.config.forget_threshold)
        keep = keep_newest(keep, self.config.memory_size)
        slots = {"memory": context.detach(), "positions": key_pos, "share": share.detach()}
        steps = context.shape[1] - state.memory.shape[1]
        position = state.position + steps
        cache = next_cache(keep, key_valid, slots, position, state.evictions)
        return TransformerXLState(**cache, open_inputs=state.open_inputs)

    def reference_forward(
        self, x: Tensor, state: TransformerXLState | None = None
    ) -> tuple[Tensor, TransformerXLState]:
        """Every score from the formula, one (query, key) pair at a time; softmax per query."""
        state = self._state_or_init(x, state)
        return in_segments(self._reference_segment, x, state, self.config.segment_len)

    def _reference_segment(
        self, x: Tensor, state: TransformerXLState, closes: bool
    ) -> tuple[Tensor, TransformerXLState | None]:
        batch, steps, _ = x.shape
        slots = state.memory.shape[1]
        q = self._heads(self.query(x))  # [B, T, H, Dh]
        k = self._heads(self.key(torch.cat([state.memory, x], dim=1)))  # [B, M+T, H, Dh]
        v = self._heads(self.value(torch.cat([state.memory, x], dim=1)))
        share = torch.zeros(batch, slots + steps, dtype=x.dtype, device=x.device)
        outputs = []
        for i in range(steps):
            pos_i = state.position + i  # [B]
            scores, values, keys = [], [], []
            for j in range(slots):
                score = self._reference_score(q[:, i], k[:, j], pos_i - state.positions[:, j])
                scores.append(torch.where(state.valid[:, j, None], score, float("-inf")))
                values.append(v[:, j])
                keys.append(j)
            for j in range(i + 1):
                pos_j = state.position + j
                scores.append(self._reference_score(q[:, i], k[:, slots + j], pos_i - pos_j))
                values.append(v[:, slots + j])
                keys.append(slots + j)
            probs = torch.stack(scores, dim=-1).softmax(dim=-1)  # [B, H, keys]
            read = sum(probs[:, :, n, None] * values[n] for n in range(len(values)))  # [B, H, Dh]
            outputs.append(read.flatten(1))
            for n, j in enumerate(keys):
                share[:, j] = torch.maximum(share[:, j], probs[:, :, n].mean(1).detach())
        y = self.out(torch.stack(outputs, dim=1))
        return y, (self._reference_memory(state, x, share) if closes else None)

    def _reference_score(self, q_i: Tensor, k_j: Tensor, distance: Tensor) -> Tensor:
        """One pair's score for all heads: `q_i, k_j: [B, H, Dh]`, `distance: [B]` -> `[B, H]`."""
        rel = self._heads(self.pos_proj(sinusoid(distance, self.pos_dim, q_i.dtype)))  # [B, H, Dh]
        content = ((q_i + self.content_bias) * k_j).sum(-1)
        position = ((q_i + self.position_bias) * rel).sum(-1)
        return (content + position) / math.sqrt(self.head_dim)

    def _reference_memory(
        self, state: TransformerXLState, x: Tensor, share: Tensor
    ) -> TransformerXLState:
        """Per sequence: list the candidates oldest first, drop low-share ones, keep the newest."""
        batch, steps, _ = x.shape
        slots = state.memory.shape[1]
        threshold, capacity = self.config.forget_threshold, self.config.memory_size
        kept_rows, evictions = [], state.evictions.clone()
        for b in range(batch):
            candidates = [
                (state.memory[b, j], state.positions[b, j], share[b, j])
                for j in range(slots)
                if state.valid[b, j]
            ]
            candidates += [
                (x[b, t].detach(), state.position[b] + t, share[b, slots + t]) for t in range(steps)
            ]
            kept = [c for c in candidates if threshold <= 0.0 or c[2] >= threshold]
            kept = kept[max(0, len(kept) - capacity) :]
            evictions[b] += len(candidates) - len(kept)
            kept_rows.append(kept)
        return self._reference_pack(state, x, kept_rows, evictions)

    def _reference_pack(
        self,
        state: TransformerXLState,
        x: Tensor,
        kept_rows: list[list[tuple[Tensor, Tensor, Tensor]]],
        evictions: Tensor,
    ) -> TransformerXLState:
        """Each sequence's kept entries at the front of zero-initialised slots."""
        memory, positions, valid, share = rows_to_slots(kept_rows, x)
        position = state.position + x.shape[1]
        return TransformerXLState(
            memory, positions, valid, share, position, evictions, state.open_inputs
        )
