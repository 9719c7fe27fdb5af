"""The plain PyTorch training loop: no Ray here, so tests and debugging can run it directly.

Truncated backprop through time: each batch row is one stream, cut into segments; the memory state
is carried (detached) from one segment to the next and starts empty at every new batch, which is a
stream boundary. One optimizer step per segment.

No step waits for the device: losses stay device tensors until `train_steps` reads a whole logging
window at once (`pipelines.train.metrics.TrainWindow`), as nanoGPT reads its loss only every
`log_interval` iterations. The Ray worker runs this same `train_steps`, so the plain loop and the
worker pay the same host round trips.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from memory_models.architectures import TokenModel
from memory_models.model import ModelState
from pipelines.data.tbptt import segments
from pipelines.train.metrics import EvalAccumulator, TrainWindow

IGNORE_INDEX = -100

Batch = Mapping[str, Tensor]
T = TypeVar("T")


class TrainingModule(nn.Module):
    """Wraps the model so one forward returns the full training loss.

    The compressive mechanism's reconstruction loss reaches only the compression parameters, and
    only on segments where something is compressed; returning it from `forward` lets DDP (with
    `find_unused_parameters`) see every parameter that took part in the step.
    """

    def __init__(self, model: TokenModel, aux_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.aux_loss_weight = aux_loss_weight

    def forward(
        self,
        inputs: Tensor,
        labels: Tensor,
        state: ModelState | None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, ModelState]:
        # An encoder-decoder reads `context` (encoding it into its memory) on a row's first segment.
        extra = {} if context is None else {"context": context}
        logits, state = self.model(inputs, state, **extra)  # [B, S, V]
        # Sum over the scored tokens divided by their count (at least 1), rather than the mean
        # reduction and a check for "nothing scored" that would wait for the device: a segment
        # with no scored token then gives 0 and still keeps the graph.
        summed = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        task_loss = summed / (labels != IGNORE_INDEX).sum().clamp_min(1)
        aux = self.model.auxiliary_loss()
        aux = task_loss.new_zeros(()) if aux is None else aux
        return task_loss + self.aux_loss_weight * aux, task_loss.detach(), aux.detach(), state


@dataclass(frozen=True)
class StepResult:
    """One `train_batch` call. The losses stay on the device: reading `loss`, `aux_loss` or
    `memory` waits for it (a host sync), so loops read them through `TrainWindow` instead."""

    loss_sum: Tensor  # task loss summed over the batch's segments, 0-d, on the device
    aux_sum: Tensor  # auxiliary loss, likewise
    segments: int
    tokens: int
    seconds: float  # host time of the call; on CUDA, the time to queue the work, not to run it
    state: ModelState  # after the last segment, detached

    @property
    def loss(self) -> float:
        return self.loss_sum.item() / self.segments

    @property
    def aux_loss(self) -> float:
        return self.aux_sum.item() / self.segments

    @property
    def state_bytes_per_sequence(self) -> int:
        return self.state.nbytes_per_sequence()

    @property
    def memory(self) -> dict[str, float]:
        return self.state.metrics()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class StepOptions:
    """How `train_steps` runs each batch, and every how many (global) steps it logs."""

    segment_len: int | None = None
    grad_clip: float = 1.0
    autocast_dtype: torch.dtype | None = None
    log_every: int = 10


LogFn = Callable[[int, dict[str, float]], None]


SCHEDULES = ("cosine", "constant")


def lr_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10 % (`cosine`) or a constant rate (`constant`)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_batch(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    segment_len: int | None = None,
    grad_clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    """Train on one batch of streams (`inputs`, `labels`: [B, T]), segment by segment, carrying
    the memory state; one optimizer (and scheduler) step per segment.

    `model` is a `SequenceModel` or `EncoderDecoderModel`, or one already wrapped in
    `TrainingModule` (and DDP). A `context` column ([B, Tc]) is encoded on the first segment.
    """
    module = TrainingModule(model) if isinstance(model, TokenModel) else model
    started = time.perf_counter()
    inputs, labels = batch["inputs"], batch["labels"]
    length = segment_len or inputs.shape[1]
    state: ModelState | None = None
    losses: list[Tensor] = []
    aux_losses: list[Tensor] = []
    for segment in segments(inputs, length, labels):
        context = batch.get("context") if segment.reset else None
        with _autocast(inputs.device, autocast_dtype):
            loss, task_loss, aux_loss, state = module(
                segment.inputs, segment.labels, state, context
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        state = state.detach()  # truncated backprop: the next segment does not reach back here
        losses.append(task_loss)
        aux_losses.append(aux_loss)
    return StepResult(
        loss_sum=torch.stack(losses).sum(),
        aux_sum=torch.stack(aux_losses).sum(),
        segments=len(losses),
        tokens=inputs.numel(),
        seconds=time.perf_counter() - started,
        state=state,
    )


def train_steps(
    module: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    options: StepOptions,
    *,
    first_step: int = 0,
    log: LogFn | None = None,
) -> Iterator[int]:
    """`train_batch` on every batch; yields the global step after each.

    Steps are numbered on from `first_step` (a resumed run's). At every step that is a multiple of
    `options.log_every`, `log(step, metrics)` gets the window since the last log (`TrainWindow`),
    read with one host sync; without `log` nothing is read back at all.
    """
    window = TrainWindow()
    source = iter(batches)
    step = first_step
    while True:
        asked = time.perf_counter()
        batch = next(source, None)
        if batch is None:
            return
        window.waited(time.perf_counter() - asked)
        result = train_batch(
            module,
            batch,
            optimizer,
            scheduler,
            segment_len=options.segment_len,
            grad_clip=options.grad_clip,
            autocast_dtype=options.autocast_dtype,
        )
        window.add(result)
        step += 1
        if log is not None and step % options.log_every == 0:
            flushed = time.perf_counter()
            log(step, window.flush())
            window.logged(time.perf_counter() - flushed)
        yield step


@torch.no_grad()
def evaluate(
    model: TokenModel,
    batches: Iterable[Batch],
    *,
    segment_len: int | None = None,
    task_kind: str | None = None,
    bit_width: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and task metrics over `batches`, streamed in the same segments as training, and the
    memory's own metrics at the end of each row (`memory/...`, means over batches: live entries,
    evictions per token), which say whether a forget threshold did anything."""
    was_training = model.training
    model.eval()
    accumulator = EvalAccumulator(task_kind, bit_width)
    memory: list[dict[str, float]] = []
    try:
        for batch in batches:
            logits, state = _stream_logits(
                model, batch["inputs"], segment_len, autocast_dtype, batch.get("context")
            )
            accumulator.add(logits, batch)
            memory.append(state.metrics())
    finally:
        model.train(was_training)
    return accumulator.result() | _mean_memory(memory)


def _mean_memory(per_batch: list[dict[str, float]]) -> dict[str, float]:
    if not per_batch:
        return {}
    return {
        f"memory/{key}": sum(m[key] for m in per_batch) / len(per_batch) for key in per_batch[0]
    }


def _stream_logits(
    model: TokenModel, inputs: Tensor, segment_len: int | None, autocast_dtype, context=None
) -> tuple[Tensor, Any]:
    state = None
    pieces = []
    for segment in segments(inputs, segment_len or inputs.shape[1]):
        extra = {"context": context} if context is not None and segment.reset else {}
        with _autocast(inputs.device, autocast_dtype):
            logits, state = model(segment.inputs, state, **extra)
        pieces.append(logits.float())
    return torch.cat(pieces, dim=1), state  # [B, T, V] and the state after the rows


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, Tensor]:
    """Numpy or tensor columns to tensors on `device` (non-array metadata dropped).

    Integer columns narrower than int64 (compact token storage) are widened after the move, on
    the device, so the host-to-device copy moves the compact bytes.
    """
    out = {}
    for name, value in batch.items():
        tensor = value if isinstance(value, Tensor) else _as_tensor(value)
        if tensor is not None:
            tensor = tensor.to(device, non_blocking=True)
            out[name] = tensor.long() if tensor.dtype in _COMPACT_INTS else tensor
    return out


_COMPACT_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32)


def _as_tensor(value: object) -> Tensor | None:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class StartedEarly(Generic[T]):
    """Iterates `items`, whose first item is fetched in a thread from construction on.

    Starting a stream can take long: Ray Data builds and registers an executor for every
    iteration of a shard, about 0.5 s on 2 busy cores (py-spy: `create_topology_metadata`).
    Started early, that overlaps with the work before the loop asks for its first batch (DDP
    set-up before the first epoch, evaluation before the next) instead of delaying the loop.
    """

    def __init__(self, items: Iterable[T]) -> None:
        self._items = items
        self._first: list[T] = []
        self._iterator: Iterator[T] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._iterator = iter(self._items)
            self._first.extend(itertools.islice(self._iterator, 1))
        except BaseException as error:  # raised again in the consumer's thread
            self._error = error

    def __iter__(self) -> Iterator[T]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._iterator is not None
        yield from self._first
        yield from self._iterator


def limited(batches: Iterable[Batch], limit: int | None, skip: int = 0) -> Iterator[Batch]:
    """At most `limit` batches after skipping `skip` (resuming in the middle of an epoch)."""
    for index, batch in enumerate(batches):
        if limit is not None and index >= limit:
            return
        if index >= skip:
            yield batch
