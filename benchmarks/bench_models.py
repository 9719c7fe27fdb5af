"""Forward+backward tokens/s of every registered memory mechanism, fast path against a reference.

Every mechanism has a fast path and a slow, obviously correct reference that the tests hold it
to; this script says what the fast path buys, on this machine, for the same weights.

* `lstm`, `gru`: their fast path already wraps torch's fused `nn.LSTM`/`nn.GRU`, so the reference
  is a bare torch stack (embedding -> `n_layers`-deep RNN of the layer's hidden size -> head). The
  ratio is then the cost of memlab's block around the RNN (norms, output projection, MLP).
* every other kind: the reference is `SequenceModel.reference_forward`, the naive per-step path.
  It is slow, so it runs on `--ref-seq-len` tokens per row and fewer repeats, and throughputs are
  compared per token. For attention-like kinds a token costs more late in a long row, so the
  fast path is also timed at the reference length: `ratio@refT` compares like with like.

`--device cuda` times both paths on the GPU (each timed step ends in a device sync) and adds, for
attention, model TFLOP/s and model FLOPs utilisation (`flops.py`: analytic count, dense bf16 peak;
the step runs in fp32 here, so MFU against the bf16 peak is a lower bound). The state-growth
table reads byte counts and stays on the CPU.

Run from the repository root: `.venv/bin/python benchmarks/bench_models.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from bench_common import (
    add_timing_options,
    format_table,
    from_args,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    run_each,
    write_results,
)
from flops import device_error, peak_tflops, training_flops_per_token
from torch import Tensor, nn
from torch.nn import functional as F

from memory_models.model import SequenceModel, SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config

VOCAB_SIZE = 256
# A tiny size that exercises every code path in seconds; explicit options still override it.
QUICK = {
    "batch_size": 4,
    "seq_len": 32,
    "ref_seq_len": 16,
    "d_model": 32,
    "n_layers": 1,
    "warmup": 1,
    "repeats": 3,
    "ref_repeats": 1,
}
NOTE = (
    "tokens/s = batch tokens per second of forward + cross-entropy + backward (median). "
    "ratio = fast tok/s at T={seq_len} / reference tok/s at 'ref T' (per-token comparison); "
    "ratio@refT times the fast path at the reference's T too. lstm/gru references are bare "
    "torch RNN stacks of the layer's hidden size (no norms, MLP or output projection)."
)
TORCH_RNNS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}

Forward = Callable[[Tensor], tuple[Tensor, Any]]


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch_size: int
    seq_len: int
    ref_seq_len: int
    d_model: int
    n_layers: int
    warmup: int
    repeats: int
    ref_repeats: int
    device: str


@dataclasses.dataclass(frozen=True)
class ModelRow:
    kind: str
    reference: str
    fast_tokens_per_s: float
    reference_tokens_per_s: float
    reference_seq_len: int
    ratio: float
    # Fast path timed at the reference's sequence length; equals `ratio` for the torch baselines.
    ratio_at_reference_len: float
    state_bytes_per_sequence: int
    parameters: int
    reference_parameters: int
    model_tflops: float | None = None  # attention only: analytic FLOPs x fast tokens/s
    mfu: float | None = None  # model_tflops / the GPU's dense bf16 peak (CUDA only)


class TorchRNNStack(nn.Module):
    """Embedding -> torch's own multi-layer LSTM/GRU -> head: the bare kernel memlab wraps."""

    def __init__(self, rnn: type[nn.RNNBase], d_model: int, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, d_model)
        self.rnn = rnn(d_model, hidden, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB_SIZE, bias=False)

    def forward(self, tokens: Tensor) -> tuple[Tensor, None]:
        hidden_seq, _ = self.rnn(self.embedding(tokens))  # [B, T, H]
        return self.head(hidden_seq), None


def model_config(kind: str, sizes: Sizes) -> SequenceModelConfig:
    return SequenceModelConfig(
        vocab_size=VOCAB_SIZE,
        d_model=sizes.d_model,
        n_layers=sizes.n_layers,
        memory=memory_config({"kind": kind}),
    )


def build_model(kind: str, sizes: Sizes) -> SequenceModel:
    return model_config(kind, sizes).build()


def tokens_per_second(
    module: nn.Module, forward: Forward, sizes: Sizes, seq_len: int, repeats: int
) -> float:
    """Training throughput: forward, cross-entropy and backward on one random batch."""
    device = torch.device(sizes.device)
    tokens = torch.randint(0, VOCAB_SIZE, (sizes.batch_size, seq_len), device=device)
    labels = torch.randint(0, VOCAB_SIZE, (sizes.batch_size, seq_len), device=device)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        logits, _ = forward(tokens)  # [B, T, vocab]
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the work queued, not just its launch

    return sizes.batch_size * seq_len / median_seconds(step, sizes.warmup, repeats)


def state_bytes_per_sequence(model: SequenceModel, sizes: Sizes) -> int:
    """Bytes of memory state one sequence holds after `seq_len` tokens, read off a real state."""
    with torch.no_grad():
        tokens = torch.randint(0, VOCAB_SIZE, (sizes.batch_size, sizes.seq_len))
        _, state = model(tokens.to(sizes.device))
    return state.nbytes_per_sequence()


# Stream lengths for the memory-growth table: bounded mechanisms stay flat, full attention grows.
GROWTH_LENGTHS = (256, 1024, 4096)
GROWTH_SEGMENT = 256


def state_growth(kind: str, sizes: Sizes, lengths: tuple[int, ...]) -> dict[int, int]:
    """Bytes one sequence's state holds after streaming T tokens in segments, for each T.

    Read off the real state carried between segments (batch 1, no gradients), as a server keeps
    it; `memory_size` is the mechanism's default (`None`, full context, for attention).
    """
    model = build_model(kind, sizes).eval()
    held, state, seen = {}, None, 0
    with torch.no_grad():
        for length in sorted(lengths):
            while seen < length:
                step = min(GROWTH_SEGMENT, length - seen)
                _, state = model(torch.randint(0, VOCAB_SIZE, (1, step)), state)
                seen += step
            held[length] = state.nbytes_per_sequence()
    return held


def growth_table(growth: dict[str, dict[int, int]]) -> str:
    lengths = sorted(next(iter(growth.values())))
    headers = ["mechanism", *[f"T={t:,}" for t in lengths], f"x from T={lengths[0]}"]
    cells = [
        [kind, *[f"{held[t]:,}" for t in lengths], f"{held[lengths[-1]] / held[lengths[0]]:.1f}x"]
        for kind, held in growth.items()
    ]
    return format_table(headers, cells)


@dataclasses.dataclass(frozen=True)
class Reference:
    name: str
    module: nn.Module
    forward: Forward
    seq_len: int
    repeats: int


def pick_reference(kind: str, model: SequenceModel, sizes: Sizes) -> Reference:
    """torch's own RNN stack for lstm/gru; for the rest the model's slow per-step path, shorter."""
    if kind in TORCH_RNNS:
        rnn = TORCH_RNNS[kind]
        hidden = model.config.memory.memory_size
        stack = TorchRNNStack(rnn, sizes.d_model, hidden, sizes.n_layers).to(sizes.device)
        return Reference(
            f"torch nn.{rnn.__name__}", stack, stack.forward, sizes.seq_len, sizes.repeats
        )
    return Reference(
        "reference_forward", model, model.reference_forward, sizes.ref_seq_len, sizes.ref_repeats
    )


def measure_kind(kind: str, sizes: Sizes, log: Callable[[str], None]) -> ModelRow:
    """Fast path at full size, then its reference (see the module docstring for which one)."""
    torch.manual_seed(0)
    model = build_model(kind, sizes).to(sizes.device)
    fast = tokens_per_second(model, model.forward, sizes, sizes.seq_len, sizes.repeats)
    log(f"  fast path          {fast:12,.0f} tokens/s  (T={sizes.seq_len})")
    ref = pick_reference(kind, model, sizes)
    reference = tokens_per_second(ref.module, ref.forward, sizes, ref.seq_len, ref.repeats)
    log(f"  {ref.name:<18} {reference:12,.0f} tokens/s  (T={ref.seq_len})")
    fast_at_ref_len = fast
    if ref.seq_len != sizes.seq_len:
        fast_at_ref_len = tokens_per_second(model, model.forward, sizes, ref.seq_len, sizes.repeats)
        log(f"  fast path          {fast_at_ref_len:12,.0f} tokens/s  (T={ref.seq_len})")
    return ModelRow(
        kind=kind,
        reference=ref.name,
        fast_tokens_per_s=fast,
        reference_tokens_per_s=reference,
        reference_seq_len=ref.seq_len,
        ratio=fast / reference,
        ratio_at_reference_len=fast_at_ref_len / reference,
        state_bytes_per_sequence=state_bytes_per_sequence(model, sizes),
        parameters=model.num_parameters(),
        reference_parameters=sum(p.numel() for p in ref.module.parameters()),
        **_utilisation(kind, sizes, fast),
    )


def _utilisation(kind: str, sizes: Sizes, tokens_per_second: float) -> dict[str, float | None]:
    flops = training_flops_per_token(model_config(kind, sizes), sizes.seq_len)
    if flops is None:
        return {}
    tflops = flops * tokens_per_second / 1e12
    peak = peak_tflops(torch.device(sizes.device))
    return {"model_tflops": tflops, "mfu": None if peak is None else tflops / peak}


def table(rows: list[ModelRow]) -> str:
    headers = ["mechanism", "reference", "fast tok/s", "ref tok/s", "ref T", "ratio"]
    headers += ["ratio@refT", "state B/seq", "params", "ref params"]
    flops = any(row.model_tflops is not None for row in rows)
    headers += ["TFLOP/s", "MFU"] if flops else []
    cells = [
        [
            row.kind,
            row.reference,
            f"{row.fast_tokens_per_s:,.0f}",
            f"{row.reference_tokens_per_s:,.0f}",
            str(row.reference_seq_len),
            f"{row.ratio:.2f}x",
            f"{row.ratio_at_reference_len:.2f}x",
            f"{row.state_bytes_per_sequence:,}",
            f"{row.parameters:,}",
            f"{row.reference_parameters:,}",
            *(_flops_cells(row) if flops else []),
        ]
        for row in rows
    ]
    return format_table(headers, cells, left=2)


def _flops_cells(row: ModelRow) -> list[str]:
    tflops = "-" if row.model_tflops is None else f"{row.model_tflops:.3g}"
    return [tflops, "-" if row.mfu is None else f"{100 * row.mfu:.1f} %"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--ref-seq-len", type=int, default=64, help="tokens per row for reference_forward"
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--ref-repeats", type=int, default=3, help="timed reference_forward runs")
    parser.add_argument("--kinds", nargs="+", choices=list(REGISTRY), help="default: all")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_timing_options(parser, repeats=5, threads="torch threads, both sides", warmup=2)
    args = parse_with_quick(parser, argv, QUICK)
    if error := device_error(args.device):
        parser.error(error)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = from_args(Sizes, args)
    kinds = args.kinds or list(REGISTRY)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on both sides; {sizes}")
    rows = run_each(kinds, lambda kind: measure_kind(kind, sizes, log))
    lengths = (sizes.seq_len,) if args.quick else GROWTH_LENGTHS
    log(f"state held per sequence after streaming T tokens in segments of {GROWTH_SEGMENT}...")
    growth = {kind: state_growth(kind, sizes, lengths) for kind in kinds}
    log("")
    log(table(rows))
    log(textwrap.fill(NOTE.format(seq_len=sizes.seq_len), width=100))
    log("")
    log(growth_table(growth))
    write_results(
        "models.json",
        machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        dataclasses.asdict(sizes) | {"vocab_size": VOCAB_SIZE},
        rows,
        note=NOTE.format(seq_len=sizes.seq_len),
        state_bytes_by_length=growth,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
