"""The plain PyTorch training loop: no Ray here, so tests and debugging can run it directly.

Truncated backprop through time: each batch row is one stream, cut into segments; the memory state
is carried (detached) from one segment to the next and starts empty at every new batch, which is a
stream boundary. One optimizer step per segment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from memory_models.architectures import TokenModel
from memory_models.model import ModelState
from pipelines.data.tbptt import segments
from pipelines.train.metrics import EvalAccumulator

IGNORE_INDEX = -100

Batch = Mapping[str, Tensor]


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
        task_loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        if not (labels != IGNORE_INDEX).any():
            task_loss = logits.sum() * 0.0  # nothing scored in this segment: keep the graph
        aux = self.model.auxiliary_loss()
        aux = task_loss.new_zeros(()) if aux is None else aux
        return task_loss + self.aux_loss_weight * aux, task_loss.detach(), aux.detach(), state


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    tokens: int
    seconds: float
    state_bytes_per_sequence: int
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


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
    losses, aux_losses = [], []
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
        losses.append(task_loss.item())
        aux_losses.append(aux_loss.item())
    return StepResult(
        loss=sum(losses) / len(losses),
        aux_loss=sum(aux_losses) / len(aux_losses),
        tokens=inputs.numel(),
        seconds=time.perf_counter() - started,
        state_bytes_per_sequence=state.nbytes_per_sequence(),
        memory=state.metrics(),
    )


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
    """Loss and task metrics over `batches`, streamed in the same segments as training."""
    was_training = model.training
    model.eval()
    accumulator = EvalAccumulator(task_kind, bit_width)
    try:
        for batch in batches:
            logits = _stream_logits(
                model, batch["inputs"], segment_len, autocast_dtype, batch.get("context")
            )
            accumulator.add(logits, batch)
    finally:
        model.train(was_training)
    return accumulator.result()


def _stream_logits(
    model: TokenModel, inputs: Tensor, segment_len: int | None, autocast_dtype, context=None
) -> Tensor:
    state = None
    pieces = []
    for segment in segments(inputs, segment_len or inputs.shape[1]):
        extra = {"context": context} if context is not None and segment.reset else {}
        with _autocast(inputs.device, autocast_dtype):
            logits, state = model(segment.inputs, state, **extra)
        pieces.append(logits.float())
    return torch.cat(pieces, dim=1)  # [B, T, V]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, Tensor]:
    """Numpy or tensor columns to tensors on `device` (non-array metadata dropped).

    Integer columns travel in their stored type (int16 tokens: a quarter of int64's bytes) and
    are widened to int64, which embeddings and the loss take, on the device.
    """
    out = {}
    for name, value in batch.items():
        tensor = value if isinstance(value, Tensor) else _as_tensor(value)
        if tensor is not None:
            out[name] = _widen(tensor.to(device, non_blocking=True))
    return out


def _widen(tensor: Tensor) -> Tensor:
    narrow = tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8)
    return tensor.long() if narrow else tensor


def _as_tensor(value: object) -> Tensor | None:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def limited(batches: Iterable[Batch], limit: int | None, skip: int = 0) -> Iterator[Batch]:
    """At most `limit` batches after skipping `skip` (resuming in the middle of an epoch)."""
    for index, batch in enumerate(batches):
        if limit is not None and index >= limit:
            return
        if index >= skip:
            yield batch


ProgressFn = Callable[[int, StepResult], None]
