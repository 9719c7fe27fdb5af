"""Many requests, one forward pass: steps of equal length are stacked, run once, split back.

A step is one sequence's tokens and its memory (batch 1). Steps of different lengths are not padded
into one pass: a pad token would advance a session's memory. They go in separate passes, one per
length; under load most steps share a length (single tokens while generating, equal chunks from a
streaming client). States with different slot counts stack thanks to `ModelState.stack`'s padding
with empty slots, which every mechanism ignores.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from memory_models.model import ModelState, SequenceModel


@dataclass(frozen=True)
class Step:
    tokens: Tensor  # [T] long
    state: ModelState  # batch 1


@dataclass(frozen=True)
class StepResult:
    logits: Tensor  # [T, vocab]
    state: ModelState  # batch 1


@torch.inference_mode()
def run_steps(model: SequenceModel, steps: list[Step]) -> list[StepResult]:
    """Results in the order of `steps`; one forward per distinct length."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, step in enumerate(steps):
        by_length[step.tokens.shape[0]].append(index)
    results: list[StepResult | None] = [None] * len(steps)
    for indices in by_length.values():
        group = [steps[i] for i in indices]
        for index, result in zip(indices, _run_group(model, group), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


def _run_group(model: SequenceModel, steps: list[Step]) -> list[StepResult]:
    tokens = torch.stack([step.tokens for step in steps])  # [G, T]
    state = ModelState.stack([step.state for step in steps])
    logits, state = model(tokens, state)  # [G, T, vocab]
    return [StepResult(row, part) for row, part in zip(logits, state.split(1), strict=True)]
