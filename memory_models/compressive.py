"""Compressive Transformer memory: a FIFO of past inputs plus a learned compressed memory."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, Self

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from memory_models.common import chunk_positions, rotary
from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.segments import SegmentCall, in_segments, open_bytes
from memory_models.slot_cache import (
    compact_slots,
    empty_cache,
    keep_above_threshold,
    keep_largest,
    keep_newest,
    rows_to_slots,
    slot_bytes,
)
from memory_models.state import MemoryState


@dataclasses.dataclass
class CompressiveState(MemoryState):
    mem: Tensor  # [B, M, D] layer inputs of the newest tokens (the FIFO), detached
    mem_positions: Tensor  # [B, M] long: absolute position of each FIFO entry
    mem_valid: Tensor  # [B, M] bool: live FIFO slots
    mem_share: Tensor  # [B, M] attention share each FIFO entry got in the last chunk
    cmem: Tensor  # [B, C, D] compressed memories, detached
    cmem_positions: Tensor  # [B, C] long: position of the last token of each compressed block
    cmem_valid: Tensor  # [B, C] bool: live compressed slots
    cmem_share: Tensor  # [B, C] attention share each compressed slot got in the last chunk
    position: Tensor  # [B] long: tokens seen so far, the position of the next token
    evictions: Tensor  # [B] long: entries dropped for good (threshold or full compressed memory)
    compressions: Tensor  # [B] long: compressed slots created so far
    open_inputs: Tensor  # [B, P, D] layer inputs of the open segment (`position % segment_len`)

    @classmethod
    def of(
        cls,
        mem: Sequence[Tensor],
        cmem: Sequence[Tensor],
        position: Tensor,
        evictions: Tensor,
        compressions: Tensor,
        open_inputs: Tensor,
    ) -> Self:
        """The state from the FIFO's and the compressed memory's `(slots, positions, valid,
        share)`, the counters and the open segment's inputs."""
        return cls(
            mem=mem[0],
            mem_positions=mem[1],
            mem_valid=mem[2],
            mem_share=mem[3],
            cmem=cmem[0],
            cmem_positions=cmem[1],
            cmem_valid=cmem[2],
            cmem_share=cmem[3],
            position=position,
            evictions=evictions,
            compressions=compressions,
            open_inputs=open_inputs,
        )

    def live_entries(self) -> Tensor:
        return self.mem_valid.sum(1) + self.cmem_valid.sum(1)

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "evictions": self.evictions.float().mean().item(),
            "compressions": self.compressions.float().mean().item(),
        }


class CompressiveConfig(MemoryConfig):
    """`memory_size` bounds mem_len + cmem_len (FIFO slots plus compressed slots).

    `cmem_len = round(memory_size * cmem_fraction)`, `mem_len = memory_size - cmem_len`; both must
    be at least 1 and the FIFO must hold one full compression group (`mem_len >= compression_rate`).

    `segment_len`: the stream is read in segments at positions 0, S, 2S, ..., whatever the calls;
    the memories are written when a segment closes.

    `forget_threshold`: FIFO entries leaving the FIFO whose attention share in the segment (max
    over the segment's queries of the head-averaged probability) is under it are dropped instead of
    compressed; and when the compressed memory overflows, the slots of lowest share go first
    (at 0 the oldest go first, as in the paper).
    """

    kind: Literal["compressive"] = "compressive"
    threshold_range = (0.01, 0.5)  # attention shares
    memory_size: int = Field(default=32, ge=1)
    compression_rate: int = Field(default=2, ge=1)
    cmem_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    compression: Literal["conv", "mean_pool"] = "conv"
    n_heads: int = Field(default=4, ge=1)
    segment_len: int = Field(default=32, ge=1)

    @property
    def cmem_len(self) -> int:
        return round(self.memory_size * self.cmem_fraction)

    @property
    def mem_len(self) -> int:
        return self.memory_size - self.cmem_len

    @model_validator(mode="after")
    def _check_split(self) -> Self:
        if self.cmem_len < 1 or self.mem_len < 1:
            raise ValueError(
                f"memory_size={self.memory_size} with cmem_fraction={self.cmem_fraction} gives "
                f"mem_len={self.mem_len} and cmem_len={self.cmem_len}; both need at least one "
                "slot: raise memory_size or move cmem_fraction towards 0.5"
            )
        if self.mem_len < self.compression_rate:
            raise ValueError(
                f"mem_len={self.mem_len} (memory_size - round(memory_size * cmem_fraction)) is "
                f"under compression_rate={self.compression_rate}: the FIFO must hold one full "
                "group to compress; raise memory_size, lower cmem_fraction or lower "
                "compression_rate"
            )
        return self

    def build(self, d_model: int) -> CompressiveLayer:
        return CompressiveLayer(self, d_model)


@dataclasses.dataclass
class _Groups:
    """Entries leaving the FIFO in this chunk, cut into compression groups of c (oldest first)."""

    entries: Tensor  # [B, G, c, D]
    kept: Tensor  # [B, G, c] bool: survived the threshold (padding is False)
    positions: Tensor  # [B, G] long: position of each group's last token
    share: Tensor  # [B, G] highest share among the group's kept entries
    made: Tensor  # [B, G] bool: the group has a kept entry, so it becomes a compressed slot
    dropped: Tensor  # [B] long: leaving entries dropped by the threshold


class CompressiveLayer(MemoryLayer):
    """Compressive Transformer attention (Rae et al., 2019).

    Each segment attends from its tokens over `[cmem ; mem ; segment]` (all live memories
    visible, the segment causal), with rotary positions (Su et al., 2021) at every slot's stored
    absolute position.
    `mem` is a FIFO of the last layer inputs, detached. When a segment closes, entries beyond
    `mem_len` leave the FIFO oldest first, in whole groups of `compression_rate` c: the number of
    groups is the fewest that bring the FIFO back to `mem_len`, so the FIFO may briefly hold fewer
    than `mem_len` entries (never more) and no entry waits outside both memories. Each group becomes
    one compressed slot (`conv`: a learned strided Conv1d, kernel = stride = c, initialised to mean
    pooling; `mean_pool`: the mean), placed at the position of the block's last token. The
    compressed memory keeps `cmem_len` slots, the oldest leaving first.

    `memory_size` is mem_len + cmem_len (see `CompressiveConfig`). `forget_threshold > 0` drops
    leaving entries whose attention share in the chunk is under it: they are left out of their
    group (zeroed for `conv`, not averaged for `mean_pool`; a group with nothing left makes no
    slot), and an overflowing compressed memory loses its lowest-share slots first.

    `auxiliary_loss()` is the paper's attention-reconstruction loss from the last forward: content
    attention (no positions) of the chunk's inputs over the compressed entries versus over the
    slots they became, squared error, averaged over sequences that compressed something. Inputs and
    attention weights are detached, so only the compression function learns from it. It is None
    when no sequence compressed anything in the last forward (and has no gradient for `mean_pool`,
    which has no parameters).

    Segments are aligned to absolute positions and the open one's inputs are kept in the state
    (`memory_models.segments`), so any cut of a stream into calls gives the whole pass; the
    auxiliary loss is the mean over the segments a forward closed.
    """

    state_type = CompressiveState
    config: CompressiveConfig

    def __init__(self, config: CompressiveConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        heads = config.n_heads
        # Round up so any d_model works with any head count; rotary needs an even head width.
        head_dim = -(-d_model // heads)
        self.head_dim = head_dim + head_dim % 2
        inner = heads * self.head_dim
        self.query = nn.Linear(d_model, inner, bias=False)
        self.key = nn.Linear(d_model, inner, bias=False)
        self.value = nn.Linear(d_model, inner, bias=False)
        self.out = nn.Linear(inner, d_model)
        self.compressor = self._make_compressor(config, d_model)
        self._aux_loss: Tensor | None = None
        self._aux_parts: list[Tensor] = []  # the losses of the segments the current call closes

    @staticmethod
    def _make_compressor(config: CompressiveConfig, d_model: int) -> nn.Conv1d | None:
        if config.compression != "conv":
            return None
        rate = config.compression_rate
        conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate)
        # Start as mean pooling (plus noise to break symmetry) so early compressed memories are
        # already meaningful summaries rather than random projections.
        with torch.no_grad():
            eye = torch.eye(d_model)[:, :, None].expand(-1, -1, rate) / rate
            conv.weight.copy_(eye + 0.01 * torch.randn_like(conv.weight))
            conv.bias.zero_()
        return conv

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> CompressiveState:
        def empty_slots() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            cache = empty_cache(batch_size, device, dtype)
            inputs = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
            return inputs, cache["positions"], cache["valid"], cache["share"]

        counter = torch.zeros(batch_size, dtype=torch.long, device=device)
        inputs = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
        return CompressiveState.of(
            empty_slots(), empty_slots(), counter, counter.clone(), counter.clone(), inputs
        )

    def _groups_after(self, seq_len: int) -> int:
        """Compression groups formed after `seq_len` tokens in any chunking (threshold 0)."""
        overflow = max(0, seq_len - self.config.mem_len)
        return -(-overflow // self.config.compression_rate)

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        segment = self.config.segment_len
        written = seq_len - seq_len % segment
        groups = self._groups_after(written)
        mem_slots = written - groups * self.config.compression_rate
        cmem_slots = min(groups, self.config.cmem_len)
        # Per slot: the stored input, its position, its mask and its share.
        per_slot = slot_bytes(self.d_model, dtype)
        held = (mem_slots + cmem_slots) * per_slot + 3 * 8  # + position and the two counters
        return held + open_bytes(seq_len, segment, self.d_model, dtype)

    def auxiliary_loss(self) -> Tensor | None:
        return self._aux_loss

    def _add_aux(self, loss: Tensor | None) -> None:
        if loss is not None:
            self._aux_parts.append(loss)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(*t.shape[:-1], self.config.n_heads, self.head_dim)  # [B, L, H, Dh]

    def forward(
        self, x: Tensor, state: CompressiveState | None = None
    ) -> tuple[Tensor, CompressiveState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, segment by segment."""
        return self._by_segments(self._segment, x, state)

    def _by_segments(
        self, call: SegmentCall, x: Tensor, state: CompressiveState | None
    ) -> tuple[Tensor, CompressiveState]:
        """`call` over the aligned segments; the auxiliary loss is the mean of theirs."""
        state = self._state_or_init(x, state)
        self._aux_parts = []
        y, state = in_segments(call, x, state, self.config.segment_len)
        self._aux_loss = torch.stack(self._aux_parts).mean() if self._aux_parts else None
        return y, state

    def _segment(
        self, x: Tensor, state: CompressiveState, closes: bool
    ) -> tuple[Tensor, CompressiveState | None]:
        """One segment's tokens (or its open part) attending over `[cmem ; mem ; x]`."""
        context, key_pos, key_valid, query_pos = self._context(x, state)
        q = rotary(self._heads(self.query(x)), query_pos)  # [B, T, H, Dh]
        k = rotary(self._heads(self.key(context)), key_pos)  # [B, L, H, Dh]
        v = self._heads(self.value(context))  # [B, L, H, Dh]
        visible = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
        scores = torch.einsum("bthd,blhd->bhtl", q, k) / math.sqrt(self.head_dim)
        # Every query sees at least itself, so no row is all -inf.
        probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)  # [B, H, T, L]
        read = torch.einsum("bhtl,blhd->bthd", probs, v).flatten(2)  # [B, T, H*Dh]
        if not closes:
            return self.out(read), None
        share = probs.detach().mean(1).amax(1)  # [B, L]
        return self.out(read), self._update_memory(state, x, share)

    def _context(self, x: Tensor, state: CompressiveState) -> tuple[Tensor, ...]:
        """Keys' inputs `[cmem ; mem ; x]`, their positions and mask; the queries' positions."""
        batch, steps, _ = x.shape
        query_pos = chunk_positions(state.position, steps)  # [B, T]
        fresh = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
        context = torch.cat([state.cmem, state.mem, x], dim=1)  # [B, L, D]
        key_pos = torch.cat([state.cmem_positions, state.mem_positions, query_pos], dim=1)
        key_valid = torch.cat([state.cmem_valid, state.mem_valid, fresh], dim=1)  # [B, L]
        return context, key_pos, key_valid, query_pos

    def _update_memory(self, state: CompressiveState, x: Tensor, share: Tensor) -> CompressiveState:
        """Push the chunk into the FIFO, compress what leaves it, cap the compressed memory."""
        cmem_slots, steps = state.cmem.shape[1], x.shape[1]
        fifo = torch.cat([state.mem, x.detach()], dim=1)  # [B, M+T, D]
        chunk_pos = chunk_positions(state.position, steps)  # [B, T]
        fifo_pos = torch.cat([state.mem_positions, chunk_pos], dim=1)  # [B, M+T]
        fresh = torch.ones(x.shape[0], steps, dtype=torch.bool, device=x.device)
        fifo_valid = torch.cat([state.mem_valid, fresh], dim=1)  # [B, M+T]
        fifo_share = share[:, cmem_slots:]  # [B, M+T]
        leaving = self._leaving(fifo_valid)
        groups = self._group(leaving, fifo, fifo_pos, fifo_share)
        compressed = self._compress(groups.entries, groups.kept)  # [B, G, D]
        self._add_aux(self._reconstruction_loss(x, groups, compressed))
        (mem, mem_positions, mem_share), mem_valid = compact_slots(
            fifo_valid & ~leaving, [fifo, fifo_pos, fifo_share]
        )
        cmem_parts, cmem_valid, cmem_dropped = self._cap_cmem(
            state, share[:, :cmem_slots], groups, compressed.detach()
        )
        return CompressiveState.of(
            (mem, mem_positions, mem_valid, mem_share),
            (cmem_parts[0], cmem_parts[1], cmem_valid, cmem_parts[2]),
            position=state.position + steps,
            evictions=state.evictions + groups.dropped + cmem_dropped,
            compressions=state.compressions + groups.made.sum(1),
            open_inputs=state.open_inputs,
        )

    def _leaving(self, valid: Tensor) -> Tensor:
        """The oldest live entries, in whole groups of c, that bring the FIFO back to mem_len."""
        rate = self.config.compression_rate
        rank = valid.long().cumsum(1) - 1  # [B, L]: age rank among live entries, oldest 0
        overflow = (valid.sum(1) - self.config.mem_len).clamp(min=0)  # [B]
        leaving_count = (overflow + rate - 1) // rate * rate  # [B]
        return valid & (rank < leaving_count[:, None])

    def _group(self, leaving: Tensor, fifo: Tensor, positions: Tensor, share: Tensor) -> _Groups:
        """Gather leaving entries to the front and cut them into groups of c."""
        batch, rate = leaving.shape[0], self.config.compression_rate
        survive = keep_above_threshold(share, leaving, self.config.forget_threshold)
        length = int(leaving.sum(1).max().item())  # a multiple of c: each row leaves whole groups
        (entries, positions, share, kept), _ = compact_slots(
            leaving, [fifo, positions, share, survive], length=length
        )
        groups = length // rate
        kept = kept.view(batch, groups, rate)
        share = torch.where(kept, share.view(batch, groups, rate), 0.0)
        return _Groups(
            entries=entries.view(batch, groups, rate, fifo.shape[-1]),
            kept=kept,
            positions=positions.view(batch, groups, rate)[:, :, -1],
            share=share.amax(-1),
            made=kept.any(-1),
            dropped=(leaving & ~survive).sum(1),
        )

    def _compress(self, entries: Tensor, kept: Tensor) -> Tensor:
        """`entries: [B, G, c, D]`, dropped ones masked out -> one slot per group `[B, G, D]`."""
        batch, groups, rate, width = entries.shape
        masked = entries * kept[..., None].to(entries.dtype)
        if self.compressor is None:
            return masked.sum(2) / kept.sum(2, keepdim=True).clamp(min=1).to(entries.dtype)
        series = masked.reshape(batch * groups, rate, width).transpose(1, 2)  # [B*G, D, c]
        if series.shape[0] == 0:
            return entries.new_zeros(batch, groups, width)
        return self.compressor(series).view(batch, groups, width)

    def _cap_cmem(
        self, state: CompressiveState, old_share: Tensor, groups: _Groups, compressed: Tensor
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Append the new slots behind the old ones; keep `cmem_len` (newest, or highest share)."""
        slots = torch.cat([state.cmem, compressed], dim=1)  # [B, C+G, D]
        positions = torch.cat([state.cmem_positions, groups.positions], dim=1)
        valid = torch.cat([state.cmem_valid, groups.made], dim=1)
        share = torch.cat([old_share, groups.share], dim=1)
        capacity = self.config.cmem_len
        if self.config.forget_threshold <= 0.0:
            keep = keep_newest(valid, capacity)
        else:
            keep = keep_largest(valid, share, capacity)
        parts, kept_valid = compact_slots(keep, [slots, positions, share])
        return parts, kept_valid, (valid & ~keep).sum(1)

    def _content_attention(self, h: Tensor, memory: Tensor, valid: Tensor) -> Tensor:
        """Position-free attention with detached weights: `h: [B, T, D]`, `memory: [B, S, D]`."""
        q = self._heads(h @ self.query.weight.detach().T)  # [B, T, H, Dh]
        k = self._heads(memory @ self.key.weight.detach().T)  # [B, S, H, Dh]
        v = self._heads(memory @ self.value.weight.detach().T)  # [B, S, H, Dh]
        # Rows with nothing to attend to are left out of the loss; unmask them to stay finite.
        valid = valid | ~valid.any(1, keepdim=True)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_dim)
        probs = scores.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
        return torch.einsum("bhts,bshd->bthd", probs, v).flatten(2)  # [B, T, H*Dh]

    def _reconstruction_loss(self, x: Tensor, groups: _Groups, compressed: Tensor) -> Tensor | None:
        """Attention over the compressed entries vs over their compressed slots (paper, eq. 2)."""
        rows = groups.made.any(1)  # [B]
        if not bool(rows.any()):
            return None
        h = x.detach()
        old = groups.entries.flatten(1, 2)  # [B, G*c, D]
        target = self._content_attention(h, old, groups.kept.flatten(1, 2))
        approx = self._content_attention(h, compressed, groups.made)
        per_row = (target - approx).square().mean((1, 2))  # [B]
        return per_row[rows].mean()

    def reference_forward(
        self, x: Tensor, state: CompressiveState | None = None
    ) -> tuple[Tensor, CompressiveState]:
        """One query at a time over its visible keys; then a per-sequence list-based update."""
        return self._by_segments(self._reference_segment, x, state)

    def _reference_segment(
        self, x: Tensor, state: CompressiveState, closes: bool
    ) -> tuple[Tensor, CompressiveState | None]:
        batch, steps, _ = x.shape
        slots = state.cmem.shape[1] + state.mem.shape[1]
        memory = torch.cat([state.cmem, state.mem], dim=1)  # [B, S, D]
        memory_pos = torch.cat([state.cmem_positions, state.mem_positions], dim=1)
        memory_valid = torch.cat([state.cmem_valid, state.mem_valid], dim=1)
        context = torch.cat([memory, x], dim=1)
        chunk_pos = chunk_positions(state.position, steps)  # [B, T]
        positions = torch.cat([memory_pos, chunk_pos], dim=1)  # [B, S+T]
        k = rotary(self._heads(self.key(context)), positions)  # [B, S+T, H, Dh]
        v = self._heads(self.value(context))
        share = torch.zeros(batch, slots + steps, dtype=x.dtype, device=x.device)
        outputs = []
        for i in range(steps):
            q_i = rotary(self._heads(self.query(x[:, i : i + 1])), positions[:, slots + i, None])
            scores = (q_i[:, 0, None] * k[:, : slots + i + 1]).sum(-1) / math.sqrt(self.head_dim)
            fresh = torch.ones(batch, i + 1, dtype=torch.bool, device=x.device)
            mask = torch.cat([memory_valid, fresh], dim=1)  # [B, keys]
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # [B, keys, H]
            probs = scores.softmax(dim=1)
            outputs.append((probs[..., None] * v[:, : slots + i + 1]).sum(1).flatten(1))
            seen = probs.detach().mean(-1)  # [B, keys]
            share[:, : slots + i + 1] = torch.maximum(share[:, : slots + i + 1], seen)
        y = self.out(torch.stack(outputs, dim=1))
        return y, (self._reference_memory(state, x, share) if closes else None)

    def _reference_memory(
        self, state: CompressiveState, x: Tensor, share: Tensor
    ) -> CompressiveState:
        """Per sequence: FIFO as a list, leaving groups compressed one by one, then the cap."""
        batch, steps, _ = x.shape
        cmem_slots, mem_slots = state.cmem.shape[1], state.mem.shape[1]
        rate, threshold = self.config.compression_rate, self.config.forget_threshold
        evictions, compressions = state.evictions.clone(), state.compressions.clone()
        mem_rows, cmem_rows, losses = [], [], []
        for b in range(batch):
            fifo = [
                (state.mem[b, j], state.mem_positions[b, j], share[b, cmem_slots + j])
                for j in range(mem_slots)
                if state.mem_valid[b, j]
            ]
            fifo += [
                (x[b, t].detach(), state.position[b] + t, share[b, cmem_slots + mem_slots + t])
                for t in range(steps)
            ]
            groups = max(0, math.ceil((len(fifo) - self.config.mem_len) / rate))
            leaving, staying = fifo[: groups * rate], fifo[groups * rate :]
            new_slots, old_entries = [], []
            for g in range(groups):
                block = leaving[g * rate : (g + 1) * rate]
                survivors = [n for n, e in enumerate(block) if threshold <= 0 or e[2] >= threshold]
                evictions[b] += rate - len(survivors)
                if survivors:
                    slot = self._reference_compress(block, survivors)
                    best = max(block[n][2] for n in survivors)
                    new_slots.append((slot, block[-1][1], best))
                    old_entries += [block[n][0] for n in survivors]
            compressions[b] += len(new_slots)
            if new_slots:
                losses.append(self._reference_loss(x[b], old_entries, [s[0] for s in new_slots]))
            cmem = [
                (state.cmem[b, j], state.cmem_positions[b, j], share[b, j])
                for j in range(cmem_slots)
                if state.cmem_valid[b, j]
            ]
            cmem += [(slot.detach(), pos, s) for slot, pos, s in new_slots]
            kept = self._reference_cap(cmem)
            evictions[b] += len(cmem) - len(kept)
            mem_rows.append(staying)
            cmem_rows.append(kept)
        self._add_aux(torch.stack(losses).mean() if losses else None)
        return self._reference_pack(state, x, mem_rows, cmem_rows, evictions, compressions)

    def _reference_compress(self, block: list[tuple[Tensor, ...]], survivors: list[int]) -> Tensor:
        """The compression of one group from its surviving entries, written out."""
        if self.compressor is None:
            return sum(block[n][0] for n in survivors) / len(survivors)
        weight = self.compressor.weight  # [D_out, D_in, c]
        return self.compressor.bias + sum(weight[:, :, n] @ block[n][0] for n in survivors)

    def _reference_cap(self, cmem: list[tuple[Tensor, Tensor, Tensor]]) -> list[tuple]:
        """The newest `cmem_len` slots, or with a threshold the highest-share ones (ties: newer)."""
        capacity = self.config.cmem_len
        if self.config.forget_threshold <= 0.0:
            return cmem[max(0, len(cmem) - capacity) :]
        ranked = sorted(range(len(cmem)), key=lambda n: (float(cmem[n][2]), n), reverse=True)
        chosen = sorted(ranked[:capacity])
        return [cmem[n] for n in chosen]

    def _reference_loss(self, h: Tensor, old: list[Tensor], new: list[Tensor]) -> Tensor:
        """One sequence's reconstruction loss, one query at a time."""
        h = h.detach()
        w_q, w_k, w_v = (m.weight.detach() for m in (self.query, self.key, self.value))
        heads, dh = self.config.n_heads, self.head_dim

        def attend(query: Tensor, memory: list[Tensor]) -> Tensor:
            entries = torch.stack(memory)  # [S, D]
            q = (w_q @ query).view(heads, dh)
            k = (entries @ w_k.T).view(len(memory), heads, dh)
            v = (entries @ w_v.T).view(len(memory), heads, dh)
            probs = ((k * q).sum(-1) / math.sqrt(dh)).softmax(0)  # [S, H]
            return (probs[..., None] * v).sum(0).flatten()  # [H*Dh]

        errors = [(attend(h_t, old) - attend(h_t, new)).square().mean() for h_t in h]
        return torch.stack(errors).mean()

    def _reference_pack(
        self,
        state: CompressiveState,
        x: Tensor,
        mem_rows: list[list[tuple]],
        cmem_rows: list[list[tuple]],
        evictions: Tensor,
        compressions: Tensor,
    ) -> CompressiveState:
        return CompressiveState.of(
            rows_to_slots(mem_rows, x),
            rows_to_slots(cmem_rows, x),
            position=state.position + x.shape[1],
            evictions=evictions,
            compressions=compressions,
            open_inputs=state.open_inputs,
        )
