"""`SequenceModel`: embedding -> N blocks of (norm + memory layer, norm + MLP) -> head.

The memory layer of every block is built from one `memory` config picked by its `kind` tag, so the
same model, trainer and server work for every mechanism in the registry. With `reversible` the
blocks are coupled as reversible residual layers (`memory_models.reversible`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from memory_models.layer import MemoryLayer
from memory_models.registry import AnyMemoryConfig
from memory_models.reversible import coupled_forward, reversible_forward
from memory_models.state import MemoryState


class SequenceModelConfig(BaseModel):
    """The whole model: vocabulary, width, depth and the memory mechanism of every block."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The tag `memory_models.architectures` picks the model class by; the encoder-decoder's is
    #: `encoder_decoder`. Configs saved before the tag existed read as this one.
    architecture: Literal["decoder_only"] = "decoder_only"
    vocab_size: int = Field(ge=2)
    d_model: int = Field(default=64, ge=8)
    n_layers: int = Field(default=2, ge=1)
    mlp_ratio: int = Field(default=4, ge=1)
    memory: AnyMemoryConfig
    #: Reversible residual layers (Gomez et al., 2017; Kitaev et al., 2020, section 3): two
    #: residual streams, `y1 = x1 + Memory(norm(x2))`, `y2 = x2 + MLP(norm(y1))`, averaged at the
    #: end; training keeps no per-block activations and recomputes them in the backward pass.
    #: Same parameters as the plain model, a different function of them.
    reversible: bool = False

    def build(self) -> SequenceModel:
        return SequenceModel(self)


@dataclasses.dataclass
class ModelState:
    """One memory state per block; the same batch operations as a single `MemoryState`."""

    layers: list[MemoryState]

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def detach(self) -> Self:
        return ModelState([s.detach() for s in self.layers])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Self:
        return ModelState([s.to(device, dtype) for s in self.layers])

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def nbytes_per_sequence(self) -> int:
        return self.nbytes() // self.batch_size

    def metrics(self) -> dict[str, float]:
        """Per-layer memory metrics, keys prefixed `layer{i}/`."""
        return {
            f"layer{i}/{k}": v for i, s in enumerate(self.layers) for k, v in s.metrics().items()
        }

    @classmethod
    def stack(cls, states: Sequence[ModelState]) -> ModelState:
        per_layer = zip(*(s.layers for s in states), strict=True)
        return cls([type(group[0]).stack(group) for group in per_layer])

    def split(self, sizes: int | Sequence[int] = 1) -> list[ModelState]:
        per_layer = [s.split(sizes) for s in self.layers]
        return [ModelState(list(group)) for group in zip(*per_layer, strict=True)]

    def select(self, index: Tensor) -> ModelState:
        return ModelState([s.select(index) for s in self.layers])

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor under a flat name (`0.keys`, `1.hidden`): what a codec writes;
        `SequenceModel.state_from_tensors` reads it back."""
        return {
            f"{index}.{name}": tensor
            for index, layer in enumerate(self.layers)
            for name, tensor in layer.tensors().items()
        }

    def memories(self) -> list[MemoryState]:
        """The memories a client may inspect, one per block."""
        return list(self.layers)


class Block(nn.Module):
    def __init__(self, config: SequenceModelConfig) -> None:
        super().__init__()
        width = config.d_model
        self.memory_norm = nn.RMSNorm(width)
        self.memory: MemoryLayer = config.memory.build(width)
        self.mlp_norm = nn.RMSNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.mlp_ratio * width),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * width, width),
        )

    def forward(
        self, x: Tensor, state: MemoryState | None, reference: bool = False
    ) -> tuple[Tensor, MemoryState]:
        mixed, state = self.mix(x, state, reference)
        x = x + mixed
        return x + self.feed(x), state

    def mix(
        self, x: Tensor, state: MemoryState | None, reference: bool = False
    ) -> tuple[Tensor, MemoryState]:
        """The memory half of the residual: `Memory(norm(x))` and the memory's new state."""
        run = self.memory.reference_forward if reference else self.memory
        return run(self.memory_norm(x), state)

    def feed(self, x: Tensor) -> Tensor:
        """The MLP half of the residual: `MLP(norm(x))`."""
        return self.mlp(self.mlp_norm(x))


class SequenceModel(nn.Module):
    """Token model over any memory mechanism: `forward(tokens, state) -> (logits, state)`.

    With `config.reversible`, training (gradients enabled, fast path) goes through
    `reversible_forward`, which stores no per-block activations; inference and
    `reference_forward` run the same coupling under plain autograd. Setting `keep_activations`
    makes training do so too: the same function and gradients, with every activation stored.
    """

    def __init__(self, config: SequenceModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied: fewer parameters, same quality here
        # Unit-variance embeddings would make the tied head's logits grow with sqrt(d_model).
        nn.init.normal_(self.embedding.weight, std=config.d_model**-0.5)
        self.keep_activations = False
        # The summed auxiliary loss of the last reversible training forward, which the memory
        # layers cannot hand out themselves (their forward ran without autograd).
        self._stack_aux_loss: Tensor | None = None
        self._aux_from_stack = False

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype=torch.float32
    ) -> ModelState:
        return ModelState([b.memory.init_state(batch_size, device, dtype) for b in self.blocks])

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """`tokens: [B, T]` long -> `logits: [B, T, vocab]` and the advanced state."""
        return self._run(tokens, state, reference=False)

    def reference_forward(
        self, tokens: Tensor, state: ModelState | None = None
    ) -> tuple[Tensor, ModelState]:
        """The same model through every layer's slow reference path."""
        return self._run(tokens, state, reference=True)

    def _run(
        self, tokens: Tensor, state: ModelState | None, reference: bool
    ) -> tuple[Tensor, ModelState]:
        layer_states = state.layers if state is not None else [None] * len(self.blocks)
        x = self.embedding(tokens)  # [B, T, D]
        self._aux_from_stack = False
        if self.config.reversible:
            x, new_states = self._run_reversible(x, layer_states, reference)
            return self.head(self.final_norm(x)), ModelState(new_states)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states, strict=True):
            x, layer_state = block(x, layer_state, reference)
            new_states.append(layer_state)
        return self.head(self.final_norm(x)), ModelState(new_states)

    def _run_reversible(
        self, x: Tensor, layer_states: list[MemoryState | None], reference: bool
    ) -> tuple[Tensor, list[MemoryState]]:
        blocks = list(self.blocks)
        if reference or self.keep_activations or not torch.is_grad_enabled():
            return coupled_forward(blocks, x, layer_states, reference)
        x, new_states, self._stack_aux_loss = reversible_forward(blocks, x, layer_states)
        self._aux_from_stack = True
        return x, new_states

    def auxiliary_loss(self) -> Tensor | None:
        """Sum of the memory layers' auxiliary losses from the last forward, if any."""
        if self._aux_from_stack:
            return self._stack_aux_loss
        losses = [b.memory.auxiliary_loss() for b in self.blocks]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def state_from_tensors(self, tensors: dict[str, Tensor]) -> ModelState:
        """The inverse of `ModelState.tensors()`."""
        layers = []
        for index, block in enumerate(self.blocks):
            prefix = f"{index}."
            fields = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
            layers.append(block.memory.state_type(**fields))
        return ModelState(layers)

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Memory held per sequence after `seq_len` tokens, all blocks together."""
        return sum(b.memory.state_size_bytes(seq_len, dtype) for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LogitsOnly(nn.Module):
    """A `SequenceModel` seen as `tokens -> logits` from empty memory: the one-tensor view MLflow's
    model signature and `predict` expect. `.model` is the full stateful model."""

    def __init__(self, model: SequenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)[0]
