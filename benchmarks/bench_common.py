"""Timing, machine description and result files shared by the benchmark scripts.

Kept apart so that every benchmark times the same way (warm-up, then the median of repeats, which
shrugs off the odd slow run on a shared machine) and records the same machine facts beside its
numbers, without which a throughput figure cannot be compared with another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
D = TypeVar("D")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_seconds(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of `run` over `repeats` calls, after `warmup` untimed calls.

    Warm-up absorbs one-off costs (allocator growth, lazy initialisation, cold caches) that a
    long training run never pays again.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info(**extra: Any) -> dict[str, Any]:
    """What the numbers depend on: interpreter, platform and the CPUs this process may use."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        **extra,
    }


def _usable_cpus() -> int | None:
    """CPUs this process may run on (a container or `taskset` can allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def write_json(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write `payload` to `results_dir/name`, creating the folder; return the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_results(
    name: str,
    machine: dict[str, Any],
    sizes: dict[str, Any],
    rows: Sequence[Any],
    note: str | None = None,
    **more: Any,
) -> None:
    """Write the results file `name` (see `write_json`) and log where: the machine, the sizes,
    the `note` on how to read them, one record per row (dataclasses), then `more` entries."""
    payload: dict[str, Any] = {"machine": machine, "sizes": sizes}
    if note is not None:
        payload["note"] = note
    payload["results"] = [dataclasses.asdict(row) for row in rows]
    log(f"wrote {write_json(name, payload | more)}")


def run_each(
    items: Sequence[T], measure: Callable[[T], R], label: Callable[[T], str] = str
) -> list[R]:
    """`measure(item)` for each item in turn, logging `[i/n] label(item)` before each: a long
    benchmark shows its progress."""
    results = []
    for index, item in enumerate(items, start=1):
        log(f"[{index}/{len(items)}] {label(item)}")
        results.append(measure(item))
    return results


def format_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Plain-text table: the first `left` columns left-aligned (names), the rest right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index < left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * width for width in widths]), *map(line, rows)])


def add_timing_options(
    parser: argparse.ArgumentParser, repeats: int, threads: str, warmup: int | None = None
) -> None:
    """The options of a timed benchmark: untimed warm-up runs (where it has them), timed runs
    whose median is reported, the threads (`threads` says whose), and `--quick`."""
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=1, help=threads)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")


def parse_with_quick(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Parse `argv`; with `--quick`, parse again over the `quick` sizes, so that options given
    next to `--quick` still win over them."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def from_args(cls: type[D], args: argparse.Namespace) -> D:
    """The dataclass `cls` (a benchmark's settings) from the parsed options of the same names."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def log(message: str) -> None:
    print(message, flush=True)
