"""NTM / MANN memory network: a controller that reads and writes an external matrix of rows."""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.state import MemoryState

# Memory starts (and freed rows restart) at a small constant rather than zero: a zero row has no
# direction, so its cosine and the cosine's gradient are 0/0, the classic source of NTM NaNs.
MEMORY_INIT = 1e-6
# Added to the norm product of the cosine so that a vanishing key never divides by zero.
_COSINE_EPS = 1e-8


@dataclasses.dataclass
class MemoryNetworkState(MemoryState):
    memory: Tensor  # [B, N, W] the rows
    usage: Tensor  # [B, N] in [0, 1]: decayed attention share; 1 when just written
    live: Tensor  # [B, N] bool: rows written and not freed since
    read_weights: Tensor  # [B, N, R] last read weighting of each head (rows at dim 1)
    write_weights: Tensor  # [B, N] last write weighting
    read_vectors: Tensor  # [B, R, W] what the heads read last step
    hidden: Tensor  # [B, C] controller output
    cell: Tensor  # [B, C] LSTM controller cell (stays zero for the MLP controller)
    frees: Tensor  # [B] long: rows freed so far

    def live_entries(self) -> Tensor:
        return self.live.sum(1)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "frees": self.frees.float().mean().item()}


class MemoryNetworkConfig(MemoryConfig):
    """`memory_size` is the number of memory rows N (each `word_size` numbers wide).

    `forget_threshold`: after every token, a live row whose usage is under it is freed: reset to
    the initial constant, marked not live, and preferred by the next allocating write. Usage, in
    [0, 1], is the row's share of the heads' read and write weight, averaged with decay
    `usage_decay` per token, and restarts at 1 when the row takes a write; so a row the heads stop
    attending is freed about log(threshold) / log(usage_decay) tokens after its last write.
    0 frees nothing (usage is never negative).
    """

    kind: Literal["memory_network"] = "memory_network"
    threshold_range = (0.8, 0.99)  # decayed usage
    memory_size: int = Field(default=32, ge=1)
    word_size: int = Field(default=16, ge=1)
    n_read_heads: int = Field(default=1, ge=1)
    controller: Literal["lstm", "mlp"] = "lstm"
    controller_size: int = Field(default=64, ge=1)
    usage_decay: float = Field(default=0.95, gt=0.0, lt=1.0)

    def build(self, d_model: int) -> MemoryNetworkLayer:
        return MemoryNetworkLayer(self, d_model)


class ReadHeads(NamedTuple):
    """Parameters of the R read heads for one step, after their activations."""

    key: Tensor  # [B, R, W]
    strength: Tensor  # [B, R] >= 1 (1 + softplus)
    gate: Tensor  # [B, R] in (0, 1): content weighting vs the previous weighting


class WriteHead(NamedTuple):
    """Parameters of the write head for one step, after their activations."""

    key: Tensor  # [B, W]
    strength: Tensor  # [B] >= 1
    gate: Tensor  # [B] in (0, 1): content weighting vs the previous write weighting
    allocation: Tensor  # [B] in (0, 1): share of the write sent to the least-used row
    erase: Tensor  # [B, W] in (0, 1)
    add: Tensor  # [B, W] in (-1, 1)


class MemoryNetworkLayer(MemoryLayer):
    """Neural Turing Machine (Graves et al., 2014) with MANN's least-recently-used allocation
    (Santoro et al., 2016).

    Per token: the controller (an LSTM cell, or a one-layer tanh MLP) reads `[x_t ; last read
    vectors]` and emits the head parameters. The write head addresses rows by content (softmax of
    key strength x cosine similarity), interpolates with its previous weighting, mixes in a
    one-hot on the least-used row (free rows first, lowest usage, lowest index), and erases/adds.
    The row with the largest write weight becomes live. The read heads then address the written
    memory the same way and read weighted sums. Usage (an exponential average of each row's
    attention share, set to 1 on the written row) is updated; live rows whose usage is under
    `forget_threshold` are freed. The output is `y_t = out([h_t ; reads_t])`.

    `memory_size` is the number of rows N, so at most N rows are ever live. `forget_threshold` is
    the usage under which a written row is freed and reset (see `MemoryNetworkConfig`).

    Fast path: the recurrence forces a loop over time, but every step is vectorised over batch,
    heads and rows, and the controller's input projection is hoisted out of the loop.
    """

    state_type = MemoryNetworkState
    config: MemoryNetworkConfig

    def __init__(self, config: MemoryNetworkConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        reads, word, hidden = config.n_read_heads, config.word_size, config.controller_size
        in_width = d_model + reads * word
        if config.controller == "lstm":
            self.controller = nn.LSTMCell(in_width, hidden)
        else:
            self.controller = nn.Linear(in_width, hidden)
        # Per read head: key, strength, gate. Write head: key, strength, gate, allocation,
        # erase, add.
        self.heads = nn.Linear(hidden, reads * (word + 2) + 3 * word + 3)
        self.out = nn.Linear(hidden + reads * word, d_model)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> MemoryNetworkState:
        rows, word = self.config.memory_size, self.config.word_size
        reads, hidden = self.config.n_read_heads, self.config.controller_size

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)

        return MemoryNetworkState(
            memory=torch.full((batch_size, rows, word), MEMORY_INIT, device=device, dtype=dtype),
            usage=zeros(rows),
            live=torch.zeros(batch_size, rows, device=device, dtype=torch.bool),
            read_weights=zeros(rows, reads),
            write_weights=zeros(rows),
            read_vectors=zeros(reads, word),
            hidden=zeros(hidden),
            cell=zeros(hidden),
            frees=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        rows, word = self.config.memory_size, self.config.word_size
        reads, hidden = self.config.n_read_heads, self.config.controller_size
        floats = rows * word + rows + rows * reads + rows + reads * word + 2 * hidden
        live_mask = rows  # one byte per bool
        frees = 8  # one long
        return floats * torch.finfo(dtype).bits // 8 + live_mask + frees

    def forward(
        self, x: Tensor, state: MemoryNetworkState | None = None
    ) -> tuple[Tensor, MemoryNetworkState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, one vectorised step per token."""
        state = self._state_or_init(x, state)
        projected = self._project_input(x)  # [B, T, 4C] (LSTM) or [B, T, C] (MLP)
        hiddens, reads = [], []
        for t in range(x.shape[1]):
            state = self._step(projected[:, t], state)
            hiddens.append(state.hidden)
            reads.append(state.read_vectors.flatten(1))
        features = torch.cat([torch.stack(hiddens, 1), torch.stack(reads, 1)], dim=-1)
        return self.out(features), state

    def _project_input(self, x: Tensor) -> Tensor:
        """The `x_t` part of the controller's input projection, for all tokens at once."""
        d_model = self.d_model
        if isinstance(self.controller, nn.LSTMCell):
            bias = self.controller.bias_ih + self.controller.bias_hh
            return x @ self.controller.weight_ih[:, :d_model].T + bias
        return x @ self.controller.weight[:, :d_model].T + self.controller.bias

    def _step(self, projected: Tensor, state: MemoryNetworkState) -> MemoryNetworkState:
        hidden, cell = self._control(projected, state)
        read_heads, write_head = self._head_parameters(hidden)
        state = dataclasses.replace(state, hidden=hidden, cell=cell)
        state = self.write(state, write_head)
        state = self.read(state, read_heads)
        return self._forget(self._update_usage(state))

    def _control(self, projected: Tensor, state: MemoryNetworkState) -> tuple[Tensor, Tensor]:
        reads = state.read_vectors.flatten(1)  # [B, R*W]
        d_model = self.d_model
        if isinstance(self.controller, nn.LSTMCell):
            cell = self.controller
            gates = (
                projected + reads @ cell.weight_ih[:, d_model:].T + state.hidden @ cell.weight_hh.T
            )
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)  # torch's i, f, g, o
            kept = torch.sigmoid(forget_gate) * state.cell
            c = kept + torch.sigmoid(in_gate) * torch.tanh(candidate)
            return torch.sigmoid(out_gate) * torch.tanh(c), c
        hidden = torch.tanh(projected + reads @ self.controller.weight[:, d_model:].T)
        return hidden, state.cell

    def _head_parameters(self, hidden: Tensor) -> tuple[ReadHeads, WriteHead]:
        reads, word = self.config.n_read_heads, self.config.word_size
        raw_read, raw_write = self.heads(hidden).split([reads * (word + 2), 3 * word + 3], -1)
        raw_read = raw_read.unflatten(-1, (reads, word + 2))  # [B, R, W+2]
        read = ReadHeads(
            key=raw_read[..., :word],
            strength=1.0 + F.softplus(raw_read[..., word]),
            gate=torch.sigmoid(raw_read[..., word + 1]),
        )
        key, strength, gate, allocation, erase, add = raw_write.split(
            [word, 1, 1, 1, word, word], -1
        )
        write = WriteHead(
            key=key,
            strength=1.0 + F.softplus(strength[:, 0]),
            gate=torch.sigmoid(gate[:, 0]),
            allocation=torch.sigmoid(allocation[:, 0]),
            erase=torch.sigmoid(erase),
            add=torch.tanh(add),
        )
        return read, write

    def write(self, state: MemoryNetworkState, head: WriteHead) -> MemoryNetworkState:
        """Address, erase/add, and mark the most-written row live. Vectorised over the batch."""
        content = _content_weights(state.memory, head.key[:, None], head.strength[:, None])
        gate = head.gate[:, None]
        interpolated = gate * content[:, 0] + (1 - gate) * state.write_weights  # [B, N]
        least_used = _least_used(state.usage, state.live).to(interpolated.dtype)  # [B, N]
        allocation = head.allocation[:, None]
        weights = allocation * least_used + (1 - allocation) * interpolated  # [B, N]
        w = weights[:, :, None]  # [B, N, 1]
        memory = state.memory * (1 - w * head.erase[:, None]) + w * head.add[:, None]
        live = state.live | _written_rows(weights)
        return dataclasses.replace(state, memory=memory, write_weights=weights, live=live)

    def read(self, state: MemoryNetworkState, heads: ReadHeads) -> MemoryNetworkState:
        """Address the (already written) memory by content and read weighted sums of rows."""
        content = _content_weights(state.memory, heads.key, heads.strength)  # [B, R, N]
        gate = heads.gate[..., None]
        weights = gate * content + (1 - gate) * state.read_weights.transpose(1, 2)  # [B, R, N]
        vectors = weights @ state.memory  # [B, R, W]
        return dataclasses.replace(
            state, read_weights=weights.transpose(1, 2), read_vectors=vectors
        )

    def _update_usage(self, state: MemoryNetworkState) -> MemoryNetworkState:
        """Usage: the row's decayed share of this step's attention, restarting at 1 when written."""
        decay, heads = self.config.usage_decay, self.config.n_read_heads + 1
        share = (state.read_weights.sum(2) + state.write_weights) / heads  # [B, N]
        usage = decay * state.usage + (1 - decay) * share
        written = _written_rows(state.write_weights)
        return dataclasses.replace(state, usage=torch.where(written, 1.0, usage))

    def _forget(self, state: MemoryNetworkState) -> MemoryNetworkState:
        """Free live rows whose usage fell under the threshold (none when it is 0)."""
        freed = state.live & (state.usage < self.config.forget_threshold)  # [B, N]
        init = torch.full_like(state.memory, MEMORY_INIT)
        return dataclasses.replace(
            state,
            memory=torch.where(freed[..., None], init, state.memory),
            usage=torch.where(freed, torch.zeros_like(state.usage), state.usage),
            live=state.live & ~freed,
            frees=state.frees + freed.sum(1),
        )

    def reference_forward(
        self, x: Tensor, state: MemoryNetworkState | None = None
    ) -> tuple[Tensor, MemoryNetworkState]:
        """Per token, per row, per head: plain loops over lists of `[B, ...]` tensors."""
        state = self._state_or_init(x, state)
        rows = _ReferenceRows.from_state(state)
        outputs = []
        for t in range(x.shape[1]):
            rows.hidden, rows.cell = self._reference_control(x[:, t], rows)
            read_heads, write_head = self._reference_head_parameters(rows.hidden)
            self._reference_write(rows, write_head)
            self._reference_read(rows, read_heads)
            self._reference_usage_and_forget(rows)
            features = torch.cat([rows.hidden, *rows.read_vectors], dim=-1)
            outputs.append(features @ self.out.weight.T + self.out.bias)
        return torch.stack(outputs, dim=1), rows.to_state()

    def _reference_control(self, x_t: Tensor, rows: _ReferenceRows) -> tuple[Tensor, Tensor]:
        inputs = torch.cat([x_t, *rows.read_vectors], dim=-1)  # [B, D + R*W]
        if isinstance(self.controller, nn.Linear):
            return torch.tanh(inputs @ self.controller.weight.T + self.controller.bias), rows.cell
        cell, size = self.controller, self.config.controller_size

        def gate(index: int) -> Tensor:
            span = slice(index * size, (index + 1) * size)
            return (
                inputs @ cell.weight_ih[span].T
                + rows.hidden @ cell.weight_hh[span].T
                + cell.bias_ih[span]
                + cell.bias_hh[span]
            )

        i, f = torch.sigmoid(gate(0)), torch.sigmoid(gate(1))
        g, o = torch.tanh(gate(2)), torch.sigmoid(gate(3))
        c = f * rows.cell + i * g
        return o * torch.tanh(c), c

    def _reference_head_parameters(self, hidden: Tensor) -> tuple[list[tuple], tuple]:
        """Each head's parameters from its own slice of the head projection."""
        raw = hidden @ self.heads.weight.T + self.heads.bias  # [B, P]
        word, offset = self.config.word_size, 0

        def take(width: int) -> Tensor:
            nonlocal offset
            piece = raw[:, offset : offset + width]
            offset += width
            return piece

        reads = []
        for _ in range(self.config.n_read_heads):
            key = take(word)
            strength = 1.0 + F.softplus(take(1)[:, 0])
            reads.append((key, strength, torch.sigmoid(take(1)[:, 0])))
        key = take(word)
        strength = 1.0 + F.softplus(take(1)[:, 0])
        gate, allocation = torch.sigmoid(take(1)[:, 0]), torch.sigmoid(take(1)[:, 0])
        write = (key, strength, gate, allocation, torch.sigmoid(take(word)), torch.tanh(take(word)))
        return reads, write

    def _reference_write(self, rows: _ReferenceRows, head: tuple) -> None:
        key, strength, gate, allocation, erase, add = head
        content = _reference_content_weights(rows.memory, key, strength)
        target = _reference_least_used(rows.usage, rows.live)  # [B] long
        weights = []
        for i in range(len(rows.memory)):
            least_used = (target == i).to(key.dtype)
            interpolated = gate * content[i] + (1 - gate) * rows.write_weights[i]
            weights.append(allocation * least_used + (1 - allocation) * interpolated)
        best, best_weight = torch.zeros_like(target), weights[0]
        for i in range(len(rows.memory)):
            w = weights[i][:, None]
            rows.memory[i] = rows.memory[i] * (1 - w * erase) + w * add
            if i > 0:
                # Strictly greater: ties go to the lowest index, as torch.argmax does.
                better = weights[i] > best_weight
                best = torch.where(better, i, best)
                best_weight = torch.where(better, weights[i], best_weight)
        for i in range(len(rows.memory)):
            rows.live[i] = rows.live[i] | (best == i)
        rows.write_weights, rows.written = weights, best

    def _reference_read(self, rows: _ReferenceRows, heads: list[tuple]) -> None:
        for r, (key, strength, gate) in enumerate(heads):
            content = _reference_content_weights(rows.memory, key, strength)
            vector = torch.zeros_like(rows.memory[0])
            for i in range(len(rows.memory)):
                weight = gate * content[i] + (1 - gate) * rows.read_weights[i][r]
                rows.read_weights[i][r] = weight
                vector = vector + weight[:, None] * rows.memory[i]
            rows.read_vectors[r] = vector

    def _reference_usage_and_forget(self, rows: _ReferenceRows) -> None:
        decay, heads = self.config.usage_decay, self.config.n_read_heads + 1
        for i in range(len(rows.memory)):
            share = (sum(rows.read_weights[i]) + rows.write_weights[i]) / heads
            usage = decay * rows.usage[i] + (1 - decay) * share
            usage = torch.where(rows.written == i, torch.ones_like(usage), usage)
            freed = rows.live[i] & (usage < self.config.forget_threshold)  # [B]
            rows.memory[i] = torch.where(
                freed[:, None], torch.full_like(rows.memory[i], MEMORY_INIT), rows.memory[i]
            )
            rows.usage[i] = torch.where(freed, torch.zeros_like(usage), usage)
            rows.live[i] = rows.live[i] & ~freed
            rows.frees = rows.frees + freed.long()


@dataclasses.dataclass
class _ReferenceRows:
    """The reference path's state: one `[B, ...]` tensor per row and per head, in lists."""

    memory: list[Tensor]  # N x [B, W]
    usage: list[Tensor]  # N x [B]
    live: list[Tensor]  # N x [B] bool
    read_weights: list[list[Tensor]]  # N x R x [B]
    write_weights: list[Tensor]  # N x [B]
    read_vectors: list[Tensor]  # R x [B, W]
    hidden: Tensor  # [B, C]
    cell: Tensor  # [B, C]
    frees: Tensor  # [B] long
    written: Tensor | None = None  # [B] long: this step's most-written row

    @classmethod
    def from_state(cls, state: MemoryNetworkState) -> _ReferenceRows:
        return cls(
            memory=list(state.memory.unbind(1)),
            usage=list(state.usage.unbind(1)),
            live=list(state.live.unbind(1)),
            read_weights=[list(w.unbind(1)) for w in state.read_weights.unbind(1)],
            write_weights=list(state.write_weights.unbind(1)),
            read_vectors=list(state.read_vectors.unbind(1)),
            hidden=state.hidden,
            cell=state.cell,
            frees=state.frees,
        )

    def to_state(self) -> MemoryNetworkState:
        return MemoryNetworkState(
            memory=torch.stack(self.memory, 1),
            usage=torch.stack(self.usage, 1),
            live=torch.stack(self.live, 1),
            read_weights=torch.stack([torch.stack(w, 1) for w in self.read_weights], 1),
            write_weights=torch.stack(self.write_weights, 1),
            read_vectors=torch.stack(self.read_vectors, 1),
            hidden=self.hidden,
            cell=self.cell,
            frees=self.frees,
        )


def _content_weights(memory: Tensor, key: Tensor, strength: Tensor) -> Tensor:
    """Softmax over rows of `strength * cosine(key, row)`.

    `memory: [B, N, W]`, `key: [B, K, W]`, `strength: [B, K]` -> `[B, K, N]`.
    """
    dots = key @ memory.transpose(1, 2)  # [B, K, N]
    norms = key.norm(dim=-1)[:, :, None] * memory.norm(dim=-1)[:, None, :]  # [B, K, N]
    return torch.softmax(strength[..., None] * dots / (norms + _COSINE_EPS), dim=-1)


def _written_rows(weights: Tensor) -> Tensor:
    """`[B, N]` bool: the row with the step's largest write weight (ties: lowest index)."""
    return F.one_hot(weights.argmax(1), weights.shape[1]).bool()


def _least_used(usage: Tensor, live: Tensor) -> Tensor:
    """One-hot `[B, N]` on the row an allocating write takes: a free row if there is one, else the
    least-used live row; lowest usage first, then lowest index."""
    among_free = torch.where(live, torch.inf, usage).argmin(1)  # [B]
    any_free = ~live.all(1)
    target = torch.where(any_free, among_free, usage.argmin(1))
    return F.one_hot(target, usage.shape[1])


def _reference_content_weights(memory: list[Tensor], key: Tensor, strength: Tensor) -> list[Tensor]:
    """Cosine of `key: [B, W]` with each row `[B, W]`, then a softmax written out: N x `[B]`."""
    key_norm = torch.sqrt((key * key).sum(-1))
    scores = []
    for row in memory:
        cosine = (key * row).sum(-1) / (key_norm * torch.sqrt((row * row).sum(-1)) + _COSINE_EPS)
        scores.append(strength * cosine)
    peak = torch.stack(scores).max(0).values.detach()
    exps = [torch.exp(score - peak) for score in scores]
    total = sum(exps)
    return [e / total for e in exps]


def _reference_least_used(usage: list[Tensor], live: list[Tensor]) -> Tensor:
    """Row index `[B]` an allocating write takes: free rows beat live ones, then lower usage, then
    lower index (each row is compared with the best so far, strictly)."""
    best = torch.zeros_like(usage[0], dtype=torch.long)
    best_free, best_usage = ~live[0], usage[0]
    for i in range(1, len(usage)):
        free = ~live[i]
        better = (free & ~best_free) | ((free == best_free) & (usage[i] < best_usage))
        best = torch.where(better, i, best)
        best_free = torch.where(better, free, best_free)
        best_usage = torch.where(better, usage[i], best_usage)
    return best
