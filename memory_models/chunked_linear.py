"""Decayed linear attention, the recurrence shared by linear attention, RetNet and GLA.

Per head the memory is a matrix `S: [Dk, Dv]`, and one step is

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t,

with the decay `a_t` per key dimension (GLA), one scalar per head (RetNet, broadcast over Dk) or
absent (linear attention: `a_t = 1`). Two ways to compute it, with the same results:

* `recurrent_decayed_attention`: the equations above, one step at a time (the reference);
* `chunked_decayed_attention`: the chunkwise-parallel form (Sun et al., 2023, eq. 7; Yang et al.,
  2024, section 4). Inside a chunk of C tokens, outputs come from causal masked matmuls whose
  weights carry the decay products `a_{j->i} = prod_{j<s<=i} a_s`; across chunks, through the
  state, which is the only sequential part.

Decays enter as `log_decay` (`log a_t <= 0`). Products are formed in log space as differences of
chunk-local cumulative sums, and only from an earlier point to a later one, so every exponent is
`<= 0`. A decay of exactly 0 (log `-inf`, a full reset, e.g. one snapped by a forget threshold)
is handled exactly, not by a floor: it is counted as a reset and left out of the sums, and a
product spanning a reset is 0 through a mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

#: Either form, as the layers pass it around: `(q, k, v, log_decay, state) -> (o, state)`.
Attend = Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor], tuple[Tensor, Tensor]]


def snap_log_decay(log_decay: Tensor, threshold: float) -> Tensor:
    """Decays under `threshold` become exactly 0 (log `-inf`): a full reset of what they scale.

    Compared in log space (`log a < log threshold`), so no decay is rounded through `exp` first.
    The gradient through a snapped decay is 0, the derivative of the constant it became.
    """
    if threshold <= 0.0:
        return log_decay
    return log_decay.masked_fill(log_decay < math.log(threshold), float("-inf"))


def recurrent_decayed_attention(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time.

    `q, k: [B, H, T, Dk]`, `v: [B, H, T, Dv]`, `log_decay: [B, H, T, Dk]` or `[B, H, T, 1]` (one
    decay per head) or None (no decay), `state: [B, H, Dk, Dv]`. Returns `o: [B, H, T, Dv]` and the
    state after the last step.
    """
    # unbind, not indexing at t: the backward of indexing builds a full-size zero tensor per step.
    steps = [t.unbind(2) for t in (q, k, v)]  # per step: [B, H, D]
    # No decay: a_t = 1; one decay per head: [B, H, 1], broadcast over the key rows.
    decays = [None] * q.shape[2] if log_decay is None else log_decay.exp().unbind(2)
    outputs = []
    for q_t, k_t, v_t, a_t in zip(*steps, decays, strict=True):
        if a_t is not None:
            state = a_t[..., None] * state  # diag(a_t) S_{t-1}
        state = state + k_t[..., :, None] * v_t[..., None, :]  # + k_t v_t^T
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))  # S_t^T q_t
    return torch.stack(outputs, dim=2), state


def chunked_decayed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None,
    state: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """The same recurrence, chunkwise parallel (arguments and results as the recurrent form).

    Work and memory are linear in T: per chunk of C steps, `[C, C]` in-chunk weights (`log2(C)`
    such matrices for a decay per key dimension), and one state update per chunk.
    """
    steps = q.shape[2]
    chunks = -(-steps // chunk_size)
    q, k, v = (_split_chunks(t, chunks, chunk_size) for t in (q, k, v))  # [B, H, N, C, D]
    decays = (
        None if log_decay is None else _ChunkDecays(_split_chunks(log_decay, chunks, chunk_size))
    )
    starts = _chunk_start_states(k, v, decays, state)  # [B, H, N+1, Dk, Dv]
    o = _inter_chunk(q, decays, starts[:, :, :-1]) + _intra_chunk(q, k, decays) @ v
    return o.flatten(2, 3)[:, :, :steps], starts[:, :, -1]


def _split_chunks(x: Tensor, chunks: int, chunk_size: int) -> Tensor:
    """`[B, H, T, D]` -> `[B, H, N, C, D]` (contiguous, for the matmuls), zero padded at the end.

    Padding is inert: zero keys and values write nothing, a zero log decay keeps the state, and
    the padded queries' outputs are dropped.
    """
    x = F.pad(x, (0, 0, 0, chunks * chunk_size - x.shape[2]))
    return x.unflatten(2, (chunks, chunk_size)).contiguous()


class _Point(NamedTuple):
    """A place in each chunk: the finite log decays summed so far, and the resets counted so far
    (None when the call has no reset at all)."""

    cumulative: Tensor
    resets: Tensor | None

    def map(self, fn: Callable[[Tensor], Tensor]) -> _Point:
        return _Point(fn(self.cumulative), None if self.resets is None else fn(self.resets))


class _ChunkDecays:
    """Decay products inside each chunk, from `log_decay: [B, H, N, C, Dd]` (Dd is Dk or 1).

    `log_decay = -inf` is a reset. The decay from point j to a later point i (the product over
    j < s <= i) is `exp(cumulative_i - cumulative_j)` when no reset lies between them (equal
    counts), else exactly 0.
    """

    def __init__(self, log_decay: Tensor) -> None:
        reset = torch.isneginf(log_decay)
        finite = torch.where(reset, 0.0, log_decay)
        # Reset masks cost a pass over every scaled entry: skipped when nothing resets.
        resets = reset.cumsum(dim=3) if bool(reset.any()) else None
        self.steps = _Point(finite.cumsum(dim=3), resets)  # after each step: [B, H, N, C, Dd]
        self.start = self.steps.map(lambda t: torch.zeros_like(t[:, :, :, :1]))  # before step 0
        self.end = self.steps.map(lambda t: t[:, :, :, -1:])  # after the last step


def _decay(later: _Point, earlier: _Point, order: Tensor | None = None) -> Tensor:
    """The decay from `earlier` to `later` (broadcast); where `order` is False (`later` before
    `earlier`), 0.

    Masking before `exp` keeps every exponent <= 0: no overflow, and a reset between the two
    points gives exactly 0 through the mask, never through `-inf - -inf`.
    """
    linked = order
    if later.resets is not None:
        same_span = later.resets == earlier.resets
        linked = same_span if linked is None else same_span & linked
    gap = later.cumulative - earlier.cumulative
    if linked is not None:
        gap = gap.masked_fill(~linked, float("-inf"))
    return gap.exp()


def _chunk_start_states(k: Tensor, v: Tensor, decays: _ChunkDecays | None, state: Tensor) -> Tensor:
    """`[B, H, N+1, Dk, Dv]`: the state before each chunk, then after the last one.

    A chunk moves the state by `S' = diag(A) S + sum_j (k_j * a_{j->end}) v_j^T`, with A the
    chunk's whole decay; only this recursion over chunks is sequential.
    """
    if decays is None:
        keys = k
        carried = None
    else:
        keys = k * _decay(decays.end, decays.steps)  # [B, H, N, C, Dk]
        whole_chunk = _decay(decays.end, decays.start)  # [B, H, N, 1, Dd]
        carried = whole_chunk.transpose(-1, -2)  # [B, H, N, Dd, 1]: diag(A) on the key rows
    written = (keys.transpose(-1, -2) @ v).unbind(2)  # N x [B, H, Dk, Dv]
    kept = [None] * len(written) if carried is None else carried.unbind(2)
    states = [state]
    for write, keep in zip(written, kept, strict=True):
        state = write + (state if keep is None else keep * state)
        states.append(state)
    return torch.stack(states, dim=2)


def _inter_chunk(q: Tensor, decays: _ChunkDecays | None, starts: Tensor) -> Tensor:
    """`[B, H, N, C, Dv]`: what each query reads from the state its chunk started with."""
    if decays is not None:
        q = q * _decay(decays.steps, decays.start)
    return q @ starts


def _intra_chunk(q: Tensor, k: Tensor, decays: _ChunkDecays | None) -> Tensor:
    """`[B, H, N, C, C]`: the weight `q_i . (a_{j->i} * k_j)` of key j in query i's read of its
    own chunk, 0 for j > i."""
    size = q.shape[3]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()  # [C(i), C(j)]
    scores = q @ k.transpose(-1, -2)
    if decays is None:
        return scores.masked_fill(~causal, 0.0)
    if decays.steps.cumulative.shape[-1] == 1:
        # One decay per head: the [C, C] matrix of ratios (Sun et al., 2023, eq. 7's D).
        later = decays.steps.map(lambda t: t[..., :, None, :])  # step i: [B, H, N, C, 1, 1]
        earlier = decays.steps.map(lambda t: t[..., None, :, :])  # step j: [B, H, N, 1, C, 1]
        return scores * _decay(later, earlier, causal[:, :, None])[..., 0]
    return _per_key_weights(q, k, decays.steps)


def _per_key_weights(q: Tensor, k: Tensor, steps: _Point) -> Tensor:
    """`_intra_chunk` for a decay per key dimension, without a `[C, C, Dk]` tensor of ratios.

    Every pair j < i is given to one halving level (see `_HalvingLevels`), where the decay is
    split at a boundary b between them: `a_{j->i} = a_{b->i} * a_{j->b}`, both factors <= 1
    (exponents <= 0; a reset in either is exact). Per level, a right-half query is scaled by
    `a_{b->i}` and a left-half key by `a_{j->b}`, and one matmul gives all the level's pairs.
    """
    levels = _HalvingLevels(q.shape[3], q.device, q.dtype)
    here = steps.map(lambda t: t[:, :, :, None])  # [B, H, N, 1, C, Dk]
    boundary = steps.map(lambda t: _at_steps(t, levels.boundary))  # [B, H, N, L, C, Dk]
    # One factor per step and level: from b for a right-half step, to b for a left-half one.
    # Both are <= 1, so the products of pairs that the level does not serve stay finite; they
    # are masked out below.
    gap = (here.cumulative - boundary.cumulative) * levels.direction[..., None]
    if here.resets is not None:
        gap = gap.masked_fill(here.resets != boundary.resets, float("-inf"))
    scale = gap.exp()
    across = (q[:, :, :, None] * scale) @ (k[:, :, :, None] * scale).transpose(-1, -2)
    same_step = torch.diag_embed((q * k).sum(-1))  # j = i: nothing to decay
    return across.masked_fill(~levels.pairs, 0.0).sum(3) + same_step  # [B, H, N, C, C]


def _at_steps(t: Tensor, index: Tensor) -> Tensor:
    """`t: [B, H, N, C, D]` at the chunk steps `index: [L, C]` -> `[B, H, N, L, C, D]`."""
    return t.index_select(3, index.flatten()).unflatten(3, index.shape)


class _HalvingLevels:
    """Which pairs of a chunk's steps each halving level serves, and through which boundary.

    Level l cuts the chunk into blocks of `2h` steps (h = 2^l), each a left and a right half.
    A pair j < i belongs to the level of the highest bit in which i and j differ: there they lie
    in the same block, i in its right half and j in its left, and the left half's last step b
    sits between them (j <= b < i). Every pair j < i has exactly one level.
    """

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype) -> None:
        half = 2 ** torch.arange((size - 1).bit_length(), device=device)[:, None]  # [L, 1]
        step = torch.arange(size, device=device)  # [C]
        block = step // (2 * half)  # [L, C]
        right = (step // half) % 2 == 1  # [L, C]: the queries each level serves; left: the keys
        # [L, C]: the sign of c_step - c_b, so that both kinds of factor have exponents <= 0.
        self.direction = torch.where(right, 1.0, -1.0).to(dtype)
        # The left half's last step; clamped in a last, partial block (it then has no queries).
        self.boundary = (block * 2 * half + half - 1).clamp(max=size - 1)  # [L, C]
        same_block = block[:, :, None] == block[:, None, :]
        self.pairs = same_block & right[:, :, None] & ~right[:, None, :]  # [L, C(i), C(j)]
