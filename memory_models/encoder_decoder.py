"""`EncoderDecoderModel`: the encoder writes a context into memory once; the decoder reads it.

The encoder-decoder Transformer (Vaswani et al., 2017, section 3.2.3) seen as a memory: a
bidirectional encoder (its own blocks of short convolution, non-causal self-attention and MLP)
reads the context `[B, Tc]`; its outputs, optionally pooled to `memory_size` slots by learned slot
queries (pooling by multi-head attention, Lee et al., Set Transformer, 2019, eq. 11; the
Perceiver's latent array, Jaegle et al., 2021), are the decoder's **cross memory**. Every decoder
block is the `SequenceModel` block (norm + self-memory of any registered kind, norm + MLP) with a
cross-attention read of that memory between the two halves:

    x = x + SelfMemory(norm(x));  x = x + CrossAttention(norm(x), memory);  x = x + MLP(norm(x))

The decoder reads the context only through the cross memory: `forward(tokens, state, context)`
encodes `context` when given and otherwise reads the memory held in `state`, so a served session
encodes a context once and then appends and generates against it any number of times.
With an empty memory (no live slot: `forward(tokens)` without context or state) every cross read is
zero (the read has no bias), and the model is exactly the `SequenceModel` with the same weights.

Forgetting: the share of a slot is, as in `memory_models.attention`, the running maximum over the
decoder's queries of the head-averaged cross-attention probability it received, maximised over the
decoder blocks and over all calls since the memory was encoded. At the end of every forward call,
live slots whose share is under `forget_threshold` are dropped (H2O-style eviction, Zhang et al.,
2023): the call itself read every slot; later calls no longer see the dropped ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.common import rotary
from memory_models.model import Block, ModelState
from memory_models.registry import AnyMemoryConfig
from memory_models.slot_cache import compact_slots, keep_above_threshold
from memory_models.state import MemoryState


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EncoderConfig(Strict):
    """The context encoder: `n_layers` blocks of a short convolution, bidirectional
    self-attention (rotary positions, padding masked) and an MLP, as wide as the decoder.

    `conv_width`: each block first mixes every position with its neighbours by a depthwise
    convolution of this (odd) width, centred (H3, Fu et al., 2023; Based, Arora et al., 2024). It
    hands a key its value's features from the start: without it, a bidirectional encoder must
    first learn a sharp attention to the next position, and recall stayed on the 1 / pairs plateau
    for thousands of steps (benchmarks/README.md). 1 mixes no neighbours.
    """

    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=4, ge=1)
    rope_base: float = Field(default=10000.0, gt=1.0)
    conv_width: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _centred(self) -> EncoderConfig:
        if self.conv_width % 2 == 0:
            raise ValueError(f"encoder.conv_width={self.conv_width} must be odd (centred)")
        return self


class CrossMemoryConfig(Strict):
    """The decoder's memory of the encoded context.

    `memory_size`: the number of slots. The encoder output is pooled to exactly this many by
    `memory_size` learned slot queries attending over the non-padding context positions, whatever
    the context's length; it fixes a parameter's shape (the slot queries). `None` keeps every
    non-padding context position as a slot, so the memory grows with the context.
    `forget_threshold`: at the end of every forward call, live slots whose cross-attention share
    (module docstring) is under it are dropped. 0 keeps every slot, and the share is then not
    computed (it stays zero), so the fast path stays one fused attention per block.
    `n_heads`: heads of the pooling and of every decoder block's cross-attention.
    """

    memory_size: int | None = Field(default=None, ge=1)
    forget_threshold: float = Field(default=0.0, ge=0.0, lt=1.0)
    n_heads: int = Field(default=4, ge=1)


class EncoderDecoderConfig(Strict):
    """`model.architecture: encoder_decoder`. `n_layers` and `memory` describe the decoder blocks
    exactly as in `SequenceModelConfig`; `encoder` and `cross_memory` are the added parts.

    `context_pad_token`: context tokens equal to it are padding (a short context in a padded
    batch); the encoder masks them and they never become slots, so a context gives the same memory
    at any padded width. `None` treats every context token as real.
    """

    architecture: Literal["encoder_decoder"] = "encoder_decoder"
    vocab_size: int = Field(ge=2)
    d_model: int = Field(default=64, ge=8)
    n_layers: int = Field(default=2, ge=1)
    mlp_ratio: int = Field(default=4, ge=1)
    memory: AnyMemoryConfig
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    cross_memory: CrossMemoryConfig = Field(default_factory=CrossMemoryConfig)
    context_pad_token: int | None = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _heads_fit_the_width(self) -> EncoderDecoderConfig:
        encoder_width = self.d_model // self.encoder.n_heads
        if self.d_model % self.encoder.n_heads or encoder_width % 2:
            raise ValueError(
                f"encoder.n_heads={self.encoder.n_heads} does not fit d_model={self.d_model}: it "
                "must divide d_model into an even head width (rotary pairs)"
            )
        if self.d_model % self.cross_memory.n_heads:
            raise ValueError(
                f"cross_memory.n_heads={self.cross_memory.n_heads} must divide "
                f"d_model={self.d_model}"
            )
        if self.context_pad_token is not None and self.context_pad_token >= self.vocab_size:
            raise ValueError(
                f"context_pad_token={self.context_pad_token} is outside the vocabulary "
                f"(vocab_size={self.vocab_size}); use a token below vocab_size, or None"
            )
        return self

    def build(self) -> EncoderDecoderModel:
        return EncoderDecoderModel(self)


@dataclasses.dataclass
class CrossMemoryState(MemoryState):
    """The encoded context as the decoder sees it."""

    slots: Tensor  # [B, M, D] the memory slots (pooled encoder outputs, or every position)
    valid: Tensor  # [B, M] bool: live slots (padding and forgotten slots are False)
    # [B, M]: running max of the cross-attention share (module docstring); zeros when
    # forget_threshold is 0, where nothing reads it.
    share: Tensor
    forgotten: Tensor  # [B] long: slots dropped by forget_threshold since encoding

    def live_entries(self) -> Tensor:
        return self.valid.sum(1)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "forgotten": self.forgotten.float().mean().item()}


@dataclasses.dataclass
class EncoderDecoderState:
    """The cross memory plus one self-memory state per decoder block; batch-first throughout, with
    the batch operations of `ModelState` (stack, split, select, detach, to)."""

    memory: CrossMemoryState
    decoder: ModelState

    @property
    def batch_size(self) -> int:
        return self.memory.batch_size

    def with_memory(self, memory: CrossMemoryState) -> EncoderDecoderState:
        """The same decoder state reading another memory (a newly encoded context)."""
        return EncoderDecoderState(memory, self.decoder)

    def detach(self) -> Self:
        return EncoderDecoderState(self.memory.detach(), self.decoder.detach())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Self:
        return EncoderDecoderState(self.memory.to(device, dtype), self.decoder.to(device, dtype))

    def nbytes(self) -> int:
        """The cross memory and every decoder block's state, the whole batch."""
        return self.memory.nbytes() + self.decoder.nbytes()

    def nbytes_per_sequence(self) -> int:
        return self.nbytes() // self.batch_size

    def metrics(self) -> dict[str, float]:
        """Cross-memory metrics under `cross/`, decoder blocks under `layer{i}/`."""
        cross = {f"cross/{k}": v for k, v in self.memory.metrics().items()}
        return cross | self.decoder.metrics()

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor under a flat name (`cross.slots`, `decoder.0.keys`): what a codec writes;
        `EncoderDecoderModel.state_from_tensors` reads it back."""
        out = {f"cross.{name}": t for name, t in self.memory.tensors().items()}
        for index, layer in enumerate(self.decoder.layers):
            out |= {f"decoder.{index}.{name}": t for name, t in layer.tensors().items()}
        return out

    def memories(self) -> list[MemoryState]:
        """The memories a client may inspect: the cross memory, then one per decoder block."""
        return [self.memory, *self.decoder.layers]

    @classmethod
    def stack(cls, states: Sequence[EncoderDecoderState]) -> EncoderDecoderState:
        memory = CrossMemoryState.stack([s.memory for s in states])
        return cls(memory, ModelState.stack([s.decoder for s in states]))

    def split(self, sizes: int | Sequence[int] = 1) -> list[EncoderDecoderState]:
        pairs = zip(self.memory.split(sizes), self.decoder.split(sizes), strict=True)
        return [EncoderDecoderState(memory, decoder) for memory, decoder in pairs]

    def select(self, index: Tensor) -> EncoderDecoderState:
        return EncoderDecoderState(self.memory.select(index), self.decoder.select(index))


def _mlp(width: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width)
    )


def _no_row_is_empty(valid: Tensor) -> Tensor:
    """`valid: [B, N]` with rows that have no live entry opened up entirely: fused attention over
    an all-masked row gives NaN, so such rows attend to (zero) padding and their read is zeroed."""
    return valid | ~valid.any(1, keepdim=True)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions; padding keys masked."""

    def __init__(self, d_model: int, config: EncoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, d_model // config.n_heads
        self.rope_base = config.rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, steps, _ = x.shape
        positions = torch.arange(steps, device=x.device).expand(batch, steps)
        q, k, v = self.qkv(x).view(batch, steps, 3, self.n_heads, self.head_dim).unbind(2)
        return rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base), v

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """`x: [B, Tc, D]`, `real: [B, Tc]` bool (not padding) -> `[B, Tc, D]`."""
        q, k, v = self._project(x)  # [B, Tc, H, Dh]
        mask = _no_row_is_empty(real)[:, None, None, :]  # [B, 1, 1, Tc]
        read = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask
        )  # [B, H, Tc, Dh]
        return self.out(read.transpose(1, 2).flatten(2))

    def reference_forward(self, x: Tensor, real: Tensor) -> Tensor:
        """Per sequence and query: softmax over the real positions only."""
        q, k, v = self._project(x)
        reads = torch.zeros_like(q)
        for b in range(x.shape[0]):
            keys = real[b].nonzero().flatten().tolist()
            # An all-padding row becomes no slot: its outputs are never read, so they stay zero.
            for t in range(x.shape[1] if keys else 0):
                reads[b, t] = _attend(q[b, t], k[b, keys], v[b, keys])
        return self.out(reads.flatten(2))


def _attend(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One query `[H, Dh]` over `keys, values: [N, H, Dh]` -> `[H, Dh]`."""
    probs = (torch.einsum("hd,nhd->hn", q, keys) / math.sqrt(q.shape[-1])).softmax(-1)
    return torch.einsum("hn,nhd->hd", probs, values)


class ShortConvolution(nn.Module):
    """Depthwise convolution over neighbouring context positions, centred; padding positions are
    zeroed first, so a context mixes the same at any padded width."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, width, padding=width // 2, groups=d_model)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """`x: [B, Tc, D]`, `real: [B, Tc]` -> `[B, Tc, D]`."""
        x = x * real[..., None]
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: int, config: EncoderConfig) -> None:
        super().__init__()
        self.conv_norm = nn.RMSNorm(d_model)
        self.conv = ShortConvolution(d_model, config.conv_width)
        self.attention_norm = nn.RMSNorm(d_model)
        self.attention = EncoderAttention(d_model, config)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = _mlp(d_model, mlp_ratio)

    def forward(self, x: Tensor, real: Tensor, reference: bool = False) -> Tensor:
        x = x + self.conv(self.conv_norm(x), real)
        attend = self.attention.reference_forward if reference else self.attention
        x = x + attend(self.attention_norm(x), real)
        return x + self.mlp(self.mlp_norm(x))


class SlotPooling(nn.Module):
    """`memory_size` learned slot queries attend over the encoder outputs (PMA, Lee et al., 2019):
    a context of any length becomes exactly `memory_size` slots."""

    def __init__(self, d_model: int, slots: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        # Unit-variance queries: with small ones every slot starts as the same near-uniform
        # average of the context and the slots are slow to tell apart (seen in training).
        self.queries = nn.Parameter(torch.randn(slots, d_model))
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, steps, _ = x.shape
        k, v = self.kv(x).view(batch, steps, 2, self.n_heads, self.head_dim).unbind(2)
        q = self.queries.view(1, -1, self.n_heads, self.head_dim).expand(batch, -1, -1, -1)
        return q, k, v  # q: [B, M, H, Dh]; k, v: [B, Tc, H, Dh]

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """`x: [B, Tc, D]`, `real: [B, Tc]` -> slots `[B, M, D]`."""
        q, k, v = self._project(x)
        mask = _no_row_is_empty(real)[:, None, None, :]
        read = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask
        )  # [B, H, M, Dh]
        return self.out(read.transpose(1, 2).flatten(2))

    def reference_forward(self, x: Tensor, real: Tensor) -> Tensor:
        q, k, v = self._project(x)
        reads = torch.zeros_like(q)
        for b in range(x.shape[0]):
            keys = real[b].nonzero().flatten().tolist()
            for m in range(q.shape[1] if keys else 0):  # an all-padding row: zero slots
                reads[b, m] = _attend(q[b, m], k[b, keys], v[b, keys])
        return self.out(reads.flatten(2))


class CrossAttention(nn.Module):
    """A decoder block's read of the cross memory: queries from the decoder, keys and values from
    the live slots (no positions: a slot's place in the context is in its content).

    Without bias in the output projection, so an empty memory reads exactly zero.
    """

    def __init__(self, d_model: int, n_heads: int, tracks_share: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.tracks_share = tracks_share
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _project(self, x: Tensor, memory: CrossMemoryState) -> tuple[Tensor, Tensor, Tensor]:
        batch, steps, _ = x.shape
        q = self.query(x).view(batch, steps, self.n_heads, self.head_dim)
        slots = memory.slots.shape[1]
        k, v = self.kv(memory.slots).view(batch, slots, 2, self.n_heads, self.head_dim).unbind(2)
        return q, k, v  # q: [B, T, H, Dh]; k, v: [B, M, H, Dh]

    def forward(self, x: Tensor, memory: CrossMemoryState) -> tuple[Tensor, Tensor]:
        """`x: [B, T, D]` -> the read `[B, T, D]` and the share this call gave each slot `[B, M]`
        (zeros unless tracked)."""
        share = memory.share.new_zeros(memory.share.shape)
        if memory.slots.shape[1] == 0:
            return torch.zeros_like(x), share
        q, k, v = self._project(x, memory)
        mask = _no_row_is_empty(memory.valid)[:, None, None, :]  # [B, 1, 1, M]
        read = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask
        )  # [B, H, T, Dh]
        read = read * memory.valid.any(1)[:, None, None, None]  # an empty memory reads zero
        if self.tracks_share:
            share = self._share(q, k, memory.valid)
        return self.out(read.transpose(1, 2).flatten(2)), share

    @torch.no_grad()
    def _share(self, q: Tensor, k: Tensor, valid: Tensor) -> Tensor:
        """`[B, M]`: the most any query of this call gave each slot (head-averaged); a decision
        statistic, not differentiated."""
        scores = torch.einsum("bthd,bmhd->bhtm", q, k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).nan_to_num(0.0)  # an empty memory: no probabilities
        return probs.mean(1).amax(1)

    def reference_forward(self, x: Tensor, memory: CrossMemoryState) -> tuple[Tensor, Tensor]:
        """Per sequence and query: softmax over the live slots, weighted sum, share by hand."""
        share = memory.share.new_zeros(memory.share.shape)
        if memory.slots.shape[1] == 0:
            return torch.zeros_like(x), share
        q, k, v = self._project(x, memory)
        reads = torch.zeros_like(q)
        for b in range(x.shape[0]):
            live = memory.valid[b].nonzero().flatten().tolist()
            for t in range(x.shape[1]):
                if not live:
                    continue
                scores = torch.einsum("hd,nhd->hn", q[b, t], k[b, live])
                probs = (scores / math.sqrt(self.head_dim)).softmax(-1)  # [H, n]
                reads[b, t] = torch.einsum("hn,nhd->hd", probs, v[b, live])
                if self.tracks_share:
                    share[b, live] = torch.maximum(share[b, live], probs.mean(0).detach())
        return self.out(reads.flatten(2)), share


class DecoderBlock(Block):
    """The `SequenceModel` block (same parameters, same names) with a cross-memory read between
    its memory half and its MLP half."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        # Block reads only d_model, mlp_ratio and memory, which both model configs hold alike.
        super().__init__(config)  # type: ignore[arg-type]
        cross = config.cross_memory
        self.cross_norm = nn.RMSNorm(config.d_model)
        self.cross = CrossAttention(config.d_model, cross.n_heads, cross.forget_threshold > 0)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        state: MemoryState | None,
        memory: CrossMemoryState,
        reference: bool = False,
    ) -> tuple[Tensor, MemoryState, Tensor]:
        mixed, state = self.mix(x, state, reference)
        x = x + mixed
        read_memory = self.cross.reference_forward if reference else self.cross
        read, share = read_memory(self.cross_norm(x), memory)
        x = x + read
        return x + self.feed(x), state, share


class EncoderDecoderModel(nn.Module):
    """`forward(tokens, state=None, context=None) -> (logits, state)` (module docstring).

    - `context: [B, Tc]` given: the encoder runs and its memory replaces the state's memory (the
      decoder blocks' own states carry on, or start empty with `state=None`);
    - no context: the memory in `state` is read (empty when `state` is None too).

    One token embedding serves the encoder and the decoder, and the head is tied to it.
    """

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = config
        width = config.d_model
        self.embedding = nn.Embedding(config.vocab_size, width)
        self.encoder = nn.ModuleList(
            EncoderBlock(width, config.mlp_ratio, config.encoder)
            for _ in range(config.encoder.n_layers)
        )
        self.encoder_norm = nn.RMSNorm(width)
        slots = config.cross_memory.memory_size
        heads = config.cross_memory.n_heads
        self.pooling = SlotPooling(width, slots, heads) if slots is not None else None
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        self.head.weight = self.embedding.weight
        # As in SequenceModel: unit-variance embeddings would make tied logits grow with width.
        nn.init.normal_(self.embedding.weight, std=width**-0.5)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype=torch.float32
    ) -> EncoderDecoderState:
        """An empty cross memory (no slots) and empty decoder memories."""
        layers = [b.memory.init_state(batch_size, device, dtype) for b in self.blocks]
        return EncoderDecoderState(self.empty_memory(batch_size, device, dtype), ModelState(layers))

    def empty_memory(
        self, batch_size: int, device: torch.device | str | None = None, dtype=torch.float32
    ) -> CrossMemoryState:
        width = self.config.d_model
        return CrossMemoryState(
            slots=torch.zeros(batch_size, 0, width, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            share=torch.zeros(batch_size, 0, device=device, dtype=dtype),
            forgotten=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def encode(self, context: Tensor, reference: bool = False) -> CrossMemoryState:
        """`context: [B, Tc]` long -> the cross memory: `memory_size` slots per row (all of them
        live unless the row is all padding), or every non-padding position, compacted to the front.
        """
        real = self._real(context)  # [B, Tc]
        x = self.embedding(context)
        for block in self.encoder:
            x = block(x, real, reference)
        x = self.encoder_norm(x)  # [B, Tc, D]
        if self.pooling is None:
            (slots,), valid = compact_slots(real, [x])
        else:
            pool = self.pooling.reference_forward if reference else self.pooling
            slots = pool(x, real)  # [B, M, D]
            valid = real.any(1, keepdim=True).expand(-1, slots.shape[1])
            slots = slots * valid[..., None]
        share = slots.new_zeros(valid.shape)
        forgotten = torch.zeros(context.shape[0], dtype=torch.long, device=context.device)
        return CrossMemoryState(slots, valid.clone(), share, forgotten)

    def _real(self, context: Tensor) -> Tensor:
        pad = self.config.context_pad_token
        return torch.ones_like(context, dtype=torch.bool) if pad is None else context != pad

    def forward(
        self,
        tokens: Tensor,
        state: EncoderDecoderState | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, EncoderDecoderState]:
        """`tokens: [B, T]` long -> `logits: [B, T, vocab]` and the advanced state."""
        return self._run(tokens, state, context, reference=False)

    def reference_forward(
        self,
        tokens: Tensor,
        state: EncoderDecoderState | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, EncoderDecoderState]:
        """The same model through the slow reference path of every part."""
        return self._run(tokens, state, context, reference=True)

    def _run(
        self,
        tokens: Tensor,
        state: EncoderDecoderState | None,
        context: Tensor | None,
        reference: bool,
    ) -> tuple[Tensor, EncoderDecoderState]:
        memory = self._memory(tokens, state, context, reference)
        layer_states = state.decoder.layers if state is not None else [None] * len(self.blocks)
        x = self.embedding(tokens)  # [B, T, D]
        received = memory.share.new_zeros(memory.share.shape)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states, strict=True):
            x, layer_state, share = block(x, layer_state, memory, reference)
            received = torch.maximum(received, share.to(received.dtype))
            new_states.append(layer_state)
        memory = self._forget(memory, torch.maximum(memory.share, received))
        return self.head(self.final_norm(x)), EncoderDecoderState(memory, ModelState(new_states))

    def _memory(
        self,
        tokens: Tensor,
        state: EncoderDecoderState | None,
        context: Tensor | None,
        reference: bool,
    ) -> CrossMemoryState:
        batch = tokens.shape[0]
        if context is not None:
            if context.shape[0] != batch:
                raise ValueError(f"context has batch {context.shape[0]} but tokens have {batch}")
            return self.encode(context, reference)
        if state is None:
            return self.empty_memory(batch, tokens.device, self.embedding.weight.dtype)
        if state.batch_size != batch:
            raise ValueError(
                f"state holds {state.batch_size} sequences but tokens have batch {batch}; "
                "stack or split states to match the batch"
            )
        return state.memory

    def _forget(self, memory: CrossMemoryState, share: Tensor) -> CrossMemoryState:
        """Drop live slots whose share is under `forget_threshold`; compact the rest forward."""
        threshold = self.config.cross_memory.forget_threshold
        if threshold <= 0.0:
            return memory
        keep = keep_above_threshold(share, memory.valid, threshold)
        (slots, share), valid = compact_slots(keep, [memory.slots, share])
        dropped = memory.valid.sum(1) - keep.sum(1)
        return CrossMemoryState(slots, valid, share, memory.forgotten + dropped)

    def state_from_tensors(self, tensors: dict[str, Tensor]) -> EncoderDecoderState:
        """The inverse of `EncoderDecoderState.tensors()`."""
        memory = CrossMemoryState(**_under(tensors, "cross."))
        layers = [
            block.memory.state_type(**_under(tensors, f"decoder.{index}."))
            for index, block in enumerate(self.blocks)
        ]
        return EncoderDecoderState(memory, ModelState(layers))

    def auxiliary_loss(self) -> Tensor | None:
        """Sum of the decoder memory layers' auxiliary losses from the last forward, if any."""
        losses = [b.memory.auxiliary_loss() for b in self.blocks]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def state_size_bytes(
        self, seq_len: int, dtype: torch.dtype = torch.float32, context_len: int | None = None
    ) -> int:
        """Bytes held per sequence after `seq_len` decoder tokens with a context of `context_len`
        tokens (default: `seq_len`): the cross memory and every decoder block's state."""
        slots = self.config.cross_memory.memory_size
        if slots is None:
            slots = seq_len if context_len is None else context_len
        value_bytes = torch.finfo(dtype).bits // 8
        # Per slot: the slot vector, its mask (bool) and its share; + the `forgotten` counter.
        cross = slots * (self.config.d_model * value_bytes + 1 + value_bytes) + 8
        return cross + sum(b.memory.state_size_bytes(seq_len, dtype) for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
