"""Peak training memory against depth, with and without reversible residual layers.

For each depth and each of plain / reversible, training steps (forward, cross-entropy, backward)
of a `SequenceModel` at a fixed size run in fresh subprocesses (one for memory, one for time), so
that no peak or allocator growth carries over from one configuration to the next. After one
warm-up step, per configuration:

* saved MB: bytes autograd keeps for the backward pass (distinct storages seen by
  `saved_tensors_hooks`): the stored activations, exact and the same on every machine;
* RSS MB: the process's peak resident memory during a step above its resident memory just
  before it (the kernel's VmHWM, reset before the step; a 1 ms sampler where it cannot be), with
  glibc told to map large blocks on their own (`MEMORY_ENV`) so that RSS follows live memory.
  It includes the parameter gradients, which grow with depth in both columns (Linux only);
* tracemalloc MB: peak Python-heap allocation during the step. PyTorch allocates CPU tensors
  outside Python's allocator, so this is only the interpreter's own share;
* CUDA MB (on a GPU): `torch.cuda.max_memory_allocated` during the step above what was
  allocated before it;
* s/step: median seconds of a training step (recomputation costs about one more forward).

"plain" is the reversible coupling with `keep_activations` (every activation stored), so both
columns compute the same function; the ordinary residual model stores about as much as "plain".

Run from the repository root: `.venv/bin/python benchmarks/bench_reversible.py [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable

import torch
from bench_common import (
    add_timing_options,
    format_table,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    run_each,
    write_results,
)
from torch import Tensor
from torch.nn import functional as F

from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config
from memory_models.saved_activations import saved_for_backward

VOCAB_SIZE = 256
MB = 2**20
QUICK = {"depths": [1, 2], "batch_size": 2, "seq_len": 64, "d_model": 32, "repeats": 1}


@dataclasses.dataclass(frozen=True)
class Setting:
    kind: str
    depth: int
    reversible: bool
    batch_size: int
    seq_len: int
    d_model: int
    repeats: int
    device: str


@dataclasses.dataclass(frozen=True)
class Measurement:
    depth: int
    reversible: bool
    saved_mb: float
    rss_mb: float
    tracemalloc_mb: float
    cuda_mb: float | None
    seconds_per_step: float


def build(setting: Setting) -> Callable[[], Tensor]:
    """The training loss on a fixed random batch, as a function that runs the forward."""
    torch.manual_seed(0)
    config = SequenceModelConfig(
        vocab_size=VOCAB_SIZE,
        d_model=setting.d_model,
        n_layers=setting.depth,
        reversible=True,
        memory=memory_config({"kind": setting.kind}),
    )
    model = config.build().to(setting.device)
    model.keep_activations = not setting.reversible
    shape = (setting.batch_size, setting.seq_len)
    tokens = torch.randint(0, VOCAB_SIZE, shape, device=setting.device)
    targets = torch.randint(0, VOCAB_SIZE, shape, device=setting.device)

    def loss() -> Tensor:
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens)  # [B, T, vocab]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return loss


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` memory figure (`VmRSS`, `VmHWM`) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _sampled_peak(run: Callable[[], None]) -> int:
    """Peak RSS during `run` sampled every millisecond (where VmHWM cannot be reset)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_bytes("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return max(peak[0], _status_bytes("VmRSS"))


def peak_rss_above_start(run: Callable[[], None]) -> float:
    """Peak resident MB during `run` above the resident memory just before it (Linux).

    Memory freed by earlier steps is handed back to the system first (`malloc_trim`), so that
    the start is what is live rather than what the allocator kept.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _status_bytes("VmRSS")
    if _reset_peak_rss():
        run()
        top = _status_bytes("VmHWM")
    else:
        top = _sampled_peak(run)
    return max(0, top - start) / MB


def saved_for_backward_mb(loss: Callable[[], Tensor]) -> float:
    """What the forward leaves for the backward (the recomputation's own saves are transient)."""
    value, held = saved_for_backward(loss)
    value.backward()
    return held / MB


def cuda_peak_mb(run: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def python_heap_peak_mb(run: Callable[[], None]) -> float:
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / MB


def training_step(setting: Setting) -> tuple[Callable[[], Tensor], Callable[[], None]]:
    """The loss function and a full step, after one warm-up step that takes one-time costs
    (lazy initialisation, allocator set-up) out of every figure."""
    loss = build(setting)

    def step() -> None:
        loss().backward()
        if setting.device == "cuda":
            torch.cuda.synchronize()

    step()
    return loss, step


def measure_memory(setting: Setting) -> dict[str, float | None]:
    loss, step = training_step(setting)
    return {
        "rss_mb": peak_rss_above_start(step),
        "cuda_mb": cuda_peak_mb(step) if setting.device == "cuda" else None,
        "tracemalloc_mb": python_heap_peak_mb(step),
        "saved_mb": saved_for_backward_mb(loss),
    }


def measure_time(setting: Setting) -> dict[str, float]:
    _, step = training_step(setting)
    return {"seconds_per_step": median_seconds(step, warmup=0, repeats=setting.repeats)}


# glibc keeps freed heap memory for reuse, so RSS would also count what earlier blocks freed.
# With a fixed mmap threshold every large tensor is mapped and unmapped on its own and RSS follows
# what is live; that slows allocation, so timing runs in another process with the default.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_part(part: str, setting: Setting, env: dict[str, str]) -> dict:
    """`measure_memory` or `measure_time` of `setting` in a fresh interpreter."""
    command = [sys.executable, __file__, f"--{part}", json.dumps(dataclasses.asdict(setting))]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_in_subprocesses(setting: Setting) -> Measurement:
    figures = run_part("memory", setting, MEMORY_ENV) | run_part("time", setting, {})
    return Measurement(depth=setting.depth, reversible=setting.reversible, **figures)


def table(rows: list[Measurement], device: str) -> str:
    by_depth: dict[int, dict[bool, Measurement]] = {}
    for row in rows:
        by_depth.setdefault(row.depth, {})[row.reversible] = row
    figures = [("saved MB", "saved_mb"), ("RSS MB", "rss_mb"), ("tracemalloc MB", "tracemalloc_mb")]
    if device == "cuda":
        figures.append(("CUDA MB", "cuda_mb"))
    headers = ["depth"]
    for label, _ in figures:
        headers += [f"{label} plain", f"{label} rev"]
    headers += ["s/step plain", "s/step rev"]
    cells = []
    for depth, pair in sorted(by_depth.items()):
        line = [str(depth)]
        for _, field in figures:
            line += [f"{getattr(pair[rev], field):,.1f}" for rev in (False, True)]
        line += [f"{pair[rev].seconds_per_step:.3f}" for rev in (False, True)]
        cells.append(line)
    return format_table(headers, cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=list(REGISTRY), default="reformer")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    add_timing_options(parser, repeats=3, threads="torch threads")
    # Internal: one part of one setting (the setting as JSON), run by `run_part`.
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory or args.time:
        part = measure_memory if args.memory else measure_time
        print(json.dumps(part(Setting(**json.loads(args.memory or args.time)))))
        return
    settings = [
        Setting(args.kind, depth, reversible, args.batch_size, args.seq_len, args.d_model,
                args.repeats, args.device)
        for depth in args.depths
        for reversible in (False, True)
    ]  # fmt: skip
    log(f"torch {torch.__version__} on {args.device}, {args.threads} thread(s); {settings[0]}")
    rows = run_each(settings, measure_in_subprocesses, describe)
    log("")
    log(table(rows, args.device))
    sizes = {
        "kind": args.kind,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "d_model": args.d_model,
        "vocab_size": VOCAB_SIZE,
        "device": args.device,
    }
    machine = machine_info(torch=torch.__version__, torch_threads=args.threads)
    write_results("reversible.json", machine, sizes, rows)


def describe(setting: Setting) -> str:
    return f"depth {setting.depth}, {'reversible' if setting.reversible else 'plain'}"


if __name__ == "__main__":
    main(sys.argv[1:])
