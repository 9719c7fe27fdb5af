"""What a command shows: memlab's own progress and summaries on the terminal, and everything the
frameworks write (Ray's and MLflow's loggers, Ray's worker and actor logs forwarded to the driver,
warnings, C++ log lines) in a log file under the run directory, named when the command ends.

The split is made at the file-descriptor level: this process's stdout and stderr (fds 1 and 2)
point at the log file for the duration of the command, and so do those of every process it starts
(Ray's raylet, workers and actors inherit them), while memlab's console writes to a duplicate of
the original terminal. `verbose` leaves everything on the terminal, as a plain program would.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from pipelines.experiment import RUNS_DIR

LOG_DIR = RUNS_DIR / "logs"


@contextmanager
def framework_logs_to_file(
    console: Console, command: str, verbose: bool, log_dir: Path = LOG_DIR
) -> Iterator[Path | None]:
    """Within the block, framework output goes to a new log file (yielded) and `console` keeps
    writing to the terminal; at the end the log file is named on the console. With `verbose`,
    nothing is redirected and None is yielded. `console` is a default Console (it follows
    sys.stdout), and is one again afterwards."""
    if verbose:
        yield None
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    path = (log_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log").resolve()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    # Where memlab's own output goes: the original fd 1, or, when sys.stdout is not fd 1 (a test
    # runner or a notebook capturing it), sys.stdout itself.
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1) if _stdout_is_fd_1() else None
    console.file = terminal or sys.stdout
    try:
        with path.open("ab") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        console.file = None  # back to following sys.stdout, as a default Console does
        if terminal is not None:
            terminal.close()
        console.print(f"framework logs (Ray, MLflow): {_shown(path)}  (-v shows them live)")


def _stdout_is_fd_1() -> bool:
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
