"""What autograd keeps for a backward pass: the measure behind the memory claims of the
reversible stack and of Mamba's recomputing scan (tests, `benchmarks/bench_reversible.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def saved_for_backward(run: Callable[[], T]) -> tuple[T, int]:
    """`run()`'s result and the bytes of the distinct storages autograd saved for the backward
    pass while it ran (`saved_tensors_hooks`; views of one storage count once). Whatever a
    backward pass saves again when it recomputes is not counted."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(storages.values())
