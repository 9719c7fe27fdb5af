"""Dynamic memory: a slot memory that grows on novel content and forgets slots nobody reads."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.state import MemoryState

# Keeps the cosine of a zero vector (a free slot, a zero candidate) at 0 instead of 0/0.
_EPS = 1e-12
# Initial key strength 1 + softplus(3) ≈ 4: cosine scores in [-4, 4] give a usefully peaked read.
_STRENGTH_BIAS = 3.0
# Names of the per-step reports in `last_step_stats`, each a `[B, T]` long tensor.
STEP_STATS = ("live_slots", "evictions", "merges", "allocations")


@dataclasses.dataclass
class DynamicMemoryState(MemoryState):
    slots: Tensor  # [B, M, S] slot contents; free slots hold zeros
    importance: Tensor  # [B, M] decayed read weight of each live slot; 0 for free slots
    live: Tensor  # [B, M] bool: slots in use (free and zero-padded slots are False)
    evictions: Tensor  # [B] long: slots freed so far (forgotten, or displaced when full)
    merges: Tensor  # [B] long: writes merged into a matching slot so far
    allocations: Tensor  # [B] long: writes into a fresh slot so far

    def live_entries(self) -> Tensor:
        return self.live.sum(1)

    def metrics(self) -> dict[str, float]:
        counters = {
            "evictions": self.evictions,
            "merges": self.merges,
            "allocations": self.allocations,
        }
        means = {name: t.float().mean().item() for name, t in counters.items()}
        return {**super().metrics(), **means}


class DynamicMemoryConfig(MemoryConfig):
    """`memory_size` is the most live slots a sequence may hold (the capacity ceiling).

    `forget_threshold`: after every token, a live slot whose importance (its read weights,
    decayed by `importance_decay` per token) is under it is freed. 0 keeps every slot until it is
    displaced at full capacity. `match_threshold` is the cosine similarity at which new content is
    merged into an existing slot instead of taking a fresh one; `slot_size` defaults to d_model.
    """

    kind: Literal["dynamic_memory"] = "dynamic_memory"
    threshold_range = (0.95, 0.999)  # decayed importance
    memory_size: int = Field(default=32, ge=1)
    slot_size: int | None = Field(default=None, ge=1)
    n_heads: int = Field(default=1, ge=1)
    importance_decay: float = Field(default=0.9, ge=0.0, le=1.0)
    match_threshold: float = Field(default=0.8, ge=-1.0, le=1.0)

    def _nothing_to_forget(self) -> str | None:
        if self.importance_decay == 1.0:
            return (
                "forget_threshold > 0 never frees a slot when importance_decay == 1 (importance "
                "then never falls below the 1 a fresh slot starts with): set importance_decay "
                "below 1 or forget_threshold to 0"
            )
        return super()._nothing_to_forget()

    def build(self, d_model: int) -> DynamicMemoryLayer:
        return DynamicMemoryLayer(self, d_model)


def _unit(v: Tensor) -> Tensor:
    """`v` scaled to unit length along the last dim (zero stays zero)."""
    return v * torch.rsqrt(v.square().sum(-1, keepdim=True) + _EPS)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two vectors `[S]`, with the same epsilon as `_unit`."""
    norms = torch.sqrt(a.square().sum() + _EPS) * torch.sqrt(b.square().sum() + _EPS)
    return (a * b).sum() / norms


class DynamicMemoryLayer(MemoryLayer):
    """Dynamic memory layer: variable live capacity with a forget threshold (seed 001, §3.1-3.2).

    Seed 001 describes a "dynamic memory layer" of variable-size memory units that grows or shrinks
    with need, set up with an initial capacity and a forget threshold; there is no single paper
    behind it. Reads use the content addressing of the Neural Turing Machine (Graves et al., 2014):
    cosine similarity sharpened by a key strength. Per token `x_t`, for every sequence:

    1. read: `n_heads` queries from `x_t` attend over the live slots with weights
       `softmax(β_t · cos(q_t, slot))`; a memory with no live slot reads zeros;
    2. each live slot's importance becomes `importance_decay · importance + read weight` (mean
       over heads);
    3. write: candidate `c_t = W_c x_t`, gate `g_t = σ(w_g · x_t)`. If the most similar live slot
       has `cos(c_t, slot) >= match_threshold`, `c_t` merges into it: `slot ← (1-g_t)·slot +
       g_t·c_t`, capacity unchanged. Otherwise it takes a fresh slot: the first free one (capacity
       grows) or, at full capacity, the live slot of lowest importance (displaced, an eviction).
       The fresh slot is cleared and gets the same gated write, `g_t·c_t`, with importance 1;
    4. forget: live slots whose importance is under `forget_threshold` are freed (evictions).

    The output is `W_o [x_t ; read_t]`. `memory_size` is the maximum number of live slots: the slot
    tensor is allocated at that size and a bool mask marks the live ones, so each sequence of a
    batch holds its own number. `forget_threshold` frees slots that are no longer read: one unread
    since it was written has importance `importance_decay^k` after k tokens. Capacity grows with
    novel content and shrinks with forgetting, never beyond `memory_size`.

    Merge/allocate/forget decisions are hard (no gradient); gradients flow through slot contents,
    candidates, gates, queries and key strengths. Every decision is per token, so the layer is chunk
    invariant. Fast path: the projections of a whole chunk up front, then a time loop (each token's
    decisions depend on the previous ones) vectorised over the batch and the slots. After every
    forward, `last_step_stats` holds one `[B, T]` long tensor per name in `STEP_STATS`: live slots
    after each token, and the evictions, merges and allocations it caused.
    """

    state_type = DynamicMemoryState
    config: DynamicMemoryConfig

    def __init__(self, config: DynamicMemoryConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.slot_size = config.slot_size or d_model
        heads = config.n_heads
        self.query = nn.Linear(d_model, heads * self.slot_size, bias=False)
        self.strength = nn.Linear(d_model, heads)
        self.candidate = nn.Linear(d_model, self.slot_size)
        self.gate = nn.Linear(d_model, 1)
        self.out = nn.Linear(d_model + heads * self.slot_size, d_model)
        nn.init.constant_(self.strength.bias, _STRENGTH_BIAS)
        self.last_step_stats: dict[str, Tensor] = {}

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> DynamicMemoryState:
        slots = self.config.memory_size

        def counter() -> Tensor:
            return torch.zeros(batch_size, dtype=torch.long, device=device)

        return DynamicMemoryState(
            slots=torch.zeros(batch_size, slots, self.slot_size, device=device, dtype=dtype),
            importance=torch.zeros(batch_size, slots, device=device, dtype=dtype),
            live=torch.zeros(batch_size, slots, dtype=torch.bool, device=device),
            evictions=counter(),
            merges=counter(),
            allocations=counter(),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # Allocated at full size from the start, so the size does not depend on seq_len.
        value_bytes = torch.finfo(dtype).bits // 8
        per_slot = self.slot_size * value_bytes + value_bytes + 1  # content, importance, mask
        return self.config.memory_size * per_slot + 3 * 8  # + three long counters

    def forward(
        self, x: Tensor, state: DynamicMemoryState | None = None
    ) -> tuple[Tensor, DynamicMemoryState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`; read, then write, then forget, token by token."""
        state = self._state_or_init(x, state)
        query, strength, candidate, gate = self._project(x)
        start, reads, trace = state, [], []
        for t in range(x.shape[1]):
            read, weights = self._read(state, query[:, t], strength[:, t])
            state = self._write(self._decay(state, weights), candidate[:, t], gate[:, t])
            state = self._forget(state)
            reads.append(read)
            trace.append(_counters(state))
        self.last_step_stats = _per_step(_counters(start), torch.stack(trace, dim=1))
        return self.out(torch.cat([x, torch.stack(reads, dim=1)], dim=-1)), state

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Everything that depends on `x` alone, for the whole chunk at once."""
        batch, steps, _ = x.shape
        query = self.query(x).view(batch, steps, self.config.n_heads, self.slot_size)
        strength = 1 + F.softplus(self.strength(x))  # [B, T, H]
        candidate = self.candidate(x)  # [B, T, S]
        return query, strength, candidate, torch.sigmoid(self.gate(x))  # gate [B, T, 1]

    def _read(
        self, state: DynamicMemoryState, query: Tensor, strength: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`query: [B, H, S]`, `strength: [B, H]` -> read `[B, H*S]`, weights `[B, H, M]`."""
        similarity = torch.einsum("bhs,bms->bhm", _unit(query), _unit(state.slots))
        live = state.live[:, None, :]  # [B, 1, M]
        scores = (strength[..., None] * similarity).masked_fill(~live, float("-inf"))
        # A memory with no live slot gets finite scores (no NaN), then all-zero weights.
        scores = scores.masked_fill(~live.any(-1, keepdim=True), 0.0)
        weights = scores.softmax(dim=-1) * live  # [B, H, M]
        read = torch.einsum("bhm,bms->bhs", weights, state.slots)  # [B, H, S]
        return read.flatten(1), weights

    def _decay(self, state: DynamicMemoryState, weights: Tensor) -> DynamicMemoryState:
        # Free slots have importance 0 and read weight 0, so they stay at 0.
        read_share = weights.detach().mean(1)  # [B, M]
        importance = self.config.importance_decay * state.importance + read_share
        return dataclasses.replace(state, importance=importance)

    def _write(
        self, state: DynamicMemoryState, candidate: Tensor, gate: Tensor
    ) -> DynamicMemoryState:
        """`candidate: [B, S]`, `gate: [B, 1]`: merge into the matching slot or take a fresh one."""
        target, merge = self._choose_slot(state, candidate.detach())
        chosen = F.one_hot(target, state.live.shape[1]).bool()  # [B, M]
        # A fresh slot is cleared first, so both cases are the same gated write.
        kept = torch.where(merge[:, None, None], state.slots, torch.zeros_like(state.slots))
        written = (1 - gate[:, :, None]) * kept + gate[:, :, None] * candidate[:, None, :]
        displaced = ~merge & state.live.all(1)  # [B]
        fresh = chosen & ~merge[:, None]  # [B, M]
        return DynamicMemoryState(
            slots=torch.where(chosen[..., None], written, state.slots),
            importance=torch.where(fresh, torch.ones_like(state.importance), state.importance),
            live=state.live | chosen,
            evictions=state.evictions + displaced.long(),
            merges=state.merges + merge.long(),
            allocations=state.allocations + (~merge).long(),
        )

    def _choose_slot(self, state: DynamicMemoryState, candidate: Tensor) -> tuple[Tensor, Tensor]:
        """The slot `[B]` each candidate goes to, and whether it merges there `[B]` bool."""
        similarity = torch.einsum("bs,bms->bm", _unit(candidate), _unit(state.slots.detach()))
        best, matching = similarity.masked_fill(~state.live, float("-inf")).max(dim=1)
        merge = best >= self.config.match_threshold  # never with no live slot (best = -inf)
        free = ~state.live
        # argmax/argmin return the first index on ties, as the reference's strict comparisons do.
        first_free = free.long().argmax(dim=1)
        weakest = state.importance.argmin(dim=1)  # used only when no slot is free
        fresh = torch.where(free.any(dim=1), first_free, weakest)
        return torch.where(merge, matching, fresh), merge

    def _forget(self, state: DynamicMemoryState) -> DynamicMemoryState:
        threshold = self.config.forget_threshold
        if threshold <= 0.0:
            return state  # importance is never negative
        forgotten = state.live & (state.importance < threshold)  # [B, M]
        live = state.live & ~forgotten
        return dataclasses.replace(
            state,
            slots=torch.where(live[..., None], state.slots, torch.zeros_like(state.slots)),
            importance=torch.where(live, state.importance, torch.zeros_like(state.importance)),
            live=live,
            evictions=state.evictions + forgotten.sum(1),
        )

    def reference_forward(
        self, x: Tensor, state: DynamicMemoryState | None = None
    ) -> tuple[Tensor, DynamicMemoryState]:
        """One sequence, one token, one slot at a time, with Python lists and `if`s."""
        state = self._state_or_init(x, state)
        memories = [_SequenceMemory.of(state, b) for b in range(x.shape[0])]
        outputs = [
            torch.stack([self._reference_step(memory, x_t) for x_t in x[b]])
            for b, memory in enumerate(memories)
        ]
        self.last_step_stats = {
            name: torch.tensor([m.stats[name] for m in memories], device=x.device)
            for name in STEP_STATS
        }
        return torch.stack(outputs), _SequenceMemory.pack(memories)

    def _reference_step(self, memory: _SequenceMemory, x_t: Tensor) -> Tensor:
        before = memory.counts()
        read = self._reference_read(memory, x_t)
        self._reference_write(memory, x_t)
        self._reference_forget(memory)
        memory.record(before)
        return self.out(torch.cat([x_t, read]))

    def _reference_read(self, memory: _SequenceMemory, x_t: Tensor) -> Tensor:
        heads, size = self.config.n_heads, self.slot_size
        queries = self.query(x_t).view(heads, size)
        strengths = 1 + F.softplus(self.strength(x_t))  # [H]
        live = [i for i, alive in enumerate(memory.live) if alive]
        reads, share = [], dict.fromkeys(live, 0.0)
        for h in range(heads):
            if not live:
                reads.append(torch.zeros(size, dtype=x_t.dtype, device=x_t.device))
                continue
            scores = [strengths[h] * _cosine(queries[h], memory.slots[i]) for i in live]
            top = max(score.detach() for score in scores)
            exps = [torch.exp(score - top) for score in scores]
            total = sum(exps)
            weights = [e / total for e in exps]
            reads.append(sum(w * memory.slots[i] for w, i in zip(weights, live, strict=True)))
            for w, i in zip(weights, live, strict=True):
                share[i] = share[i] + w.detach() / heads
        for i in live:
            memory.importance[i] = self.config.importance_decay * memory.importance[i] + share[i]
        return torch.cat(reads)

    def _reference_write(self, memory: _SequenceMemory, x_t: Tensor) -> None:
        candidate = self.candidate(x_t)
        gate = torch.sigmoid(self.gate(x_t))[0]
        best, match = None, -1
        for i, alive in enumerate(memory.live):
            if alive:
                similarity = _cosine(candidate.detach(), memory.slots[i].detach())
                if best is None or similarity > best:
                    best, match = similarity, i
        if best is not None and best >= self.config.match_threshold:
            memory.slots[match] = (1 - gate) * memory.slots[match] + gate * candidate
            memory.merges += 1
            return
        target = self._reference_fresh_slot(memory)
        memory.slots[target] = gate * candidate
        memory.importance[target] = torch.ones((), dtype=x_t.dtype, device=x_t.device)
        memory.live[target] = True
        memory.allocations += 1

    def _reference_fresh_slot(self, memory: _SequenceMemory) -> int:
        """The first free slot; when none is free, the live slot of lowest importance."""
        for i, alive in enumerate(memory.live):
            if not alive:
                return i
        weakest = 0
        for i in range(1, len(memory.live)):
            if memory.importance[i] < memory.importance[weakest]:
                weakest = i
        memory.evictions += 1
        return weakest

    def _reference_forget(self, memory: _SequenceMemory) -> None:
        for i, alive in enumerate(memory.live):
            if alive and memory.importance[i] < self.config.forget_threshold:
                memory.live[i] = False
                memory.slots[i] = torch.zeros_like(memory.slots[i])
                memory.importance[i] = torch.zeros_like(memory.importance[i])
                memory.evictions += 1


def _counters(state: DynamicMemoryState) -> Tensor:
    """`[B, 4]` long: live slots and the cumulative counters, in `STEP_STATS` order."""
    return torch.stack(
        [state.live_entries(), state.evictions, state.merges, state.allocations], dim=1
    )


def _per_step(start: Tensor, trace: Tensor) -> dict[str, Tensor]:
    """`start: [B, 4]`, `trace: [B, T, 4]` -> live slots after each step and each step's events."""
    events = trace.diff(dim=1, prepend=start[:, None])  # [B, T, 4]
    stats = {"live_slots": trace[..., 0]}
    for column, name in enumerate(STEP_STATS[1:], start=1):
        stats[name] = events[..., column]
    return stats


@dataclasses.dataclass
class _SequenceMemory:
    """One sequence's memory as Python lists, for the reference path."""

    slots: list[Tensor]  # M tensors [S]
    importance: list[Tensor]  # M scalars
    live: list[bool]
    evictions: int
    merges: int
    allocations: int
    stats: dict[str, list[int]]

    @classmethod
    def of(cls, state: DynamicMemoryState, b: int) -> _SequenceMemory:
        return cls(
            slots=list(state.slots[b].unbind(0)),
            importance=list(state.importance[b].unbind(0)),
            live=[bool(alive) for alive in state.live[b].tolist()],
            evictions=int(state.evictions[b]),
            merges=int(state.merges[b]),
            allocations=int(state.allocations[b]),
            stats={name: [] for name in STEP_STATS},
        )

    def counts(self) -> tuple[int, int, int]:
        return self.evictions, self.merges, self.allocations

    def record(self, before: tuple[int, int, int]) -> None:
        self.stats["live_slots"].append(sum(self.live))
        for name, now, then in zip(STEP_STATS[1:], self.counts(), before, strict=True):
            self.stats[name].append(now - then)

    @staticmethod
    def pack(memories: list[_SequenceMemory]) -> DynamicMemoryState:
        def counter(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=memories[0].slots[0].device)

        return DynamicMemoryState(
            slots=torch.stack([torch.stack(m.slots) for m in memories]),
            importance=torch.stack([torch.stack(m.importance) for m in memories]),
            live=torch.tensor([m.live for m in memories], device=memories[0].slots[0].device),
            evictions=counter([m.evictions for m in memories]),
            merges=counter([m.merges for m in memories]),
            allocations=counter([m.allocations for m in memories]),
        )
