"""Where the CPUs went during a span: a process tree's CPU time and the whole machine's, from /proc.

`bench_train.py` samples the tree under its own process (the driver, and the raylet, GCS and
dashboard it started, with every Ray worker under them) while a training run goes on, then reads
the CPU seconds each group of processes used between two wall-clock times (the first and last
logged step), beside what the machine's cores did in all: the rest is other users of a shared
machine. The sampling runs in a child process (`python process_cpu.py ROOT EVERY`, one JSON line
per sample), not in a thread of the driver, where it would take the interpreter lock from the
plain loop it measures; its own CPU time is left out. Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Process groups, by what the command line starts with or contains (first match wins).
GROUPS = (
    ("train workers", ("ray::RayTrainWorker",)),
    ("Ray Train/Data actors", ("ray::TrainController", "ray::PlacementGroupCleaner")),
    ("Ray Train/Data actors", ("ray::DatasetManager", "ray::SplitCoordinator")),
    ("Ray Train/Data actors", ("ray::PreemptionWatcher", "ray::_StatsActor")),
    ("Ray Train/Data actors", ("ray::_AutoscalingCoordinator",)),
    ("Ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "ray::Dashboard")),
    ("Ray daemons", ("ray::RuntimeEnv", "monitor.py", "runtime_env")),
    ("idle Ray workers", ("ray::IDLE", "default_worker.py", "setup_worker.py")),
)


@dataclass(frozen=True)
class Sample:
    time: float  # time.time(), the clock MLflow stamps metrics with
    machine_busy: float  # CPU seconds all cores spent busy since boot (not idle, I/O wait, steal)
    machine_steal: float  # CPU seconds the hypervisor took from this machine since boot
    processes: dict[int, tuple[str, float]]  # pid -> (group, CPU seconds since it started)


class TreeSampler:
    """Samples the tree under `root` every `every` seconds, in a child process, until `stop()`."""

    def __init__(self, root: int, driver_group: str = "driver", every: float = 0.5) -> None:
        self.root, self.driver_group, self.every = root, driver_group, every
        self._out = Path(tempfile.mkstemp(prefix="process-cpu-", suffix=".jsonl")[1])
        self._child: subprocess.Popen | None = None

    def start(self) -> TreeSampler:
        command = [sys.executable, __file__, str(self.root), str(self.every), self.driver_group]
        with self._out.open("w") as out:
            self._child = subprocess.Popen(command, stdout=out)
        return self

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate()
            self._child.wait()
        self._out.unlink(missing_ok=True)

    def samples(self) -> list[Sample]:
        found = []
        for line in self._out.read_text().splitlines():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            processes = {int(pid): (group, cpu) for pid, (group, cpu) in raw["p"].items()}
            found.append(Sample(raw["t"], raw["busy"], raw["steal"], processes))
        return found

    def usage(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group between `start` and `end` (time.time()), with `machine` (all
        busy cores), `outside this run` (machine minus this tree) and `steal`."""
        inside = [s for s in self.samples() if start <= s.time <= end]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        latest = {pid: seen for sample in inside for pid, seen in sample.processes.items()}
        used: dict[str, float] = {}
        for pid, (group, seconds) in latest.items():  # a process that ended: its last sample
            before = first.processes.get(pid, (group, 0.0))[1]  # started inside: all of it
            used[group] = used.get(group, 0.0) + seconds - before
        used["machine"] = last.machine_busy - first.machine_busy
        used["outside this run"] = used["machine"] - sum(
            v for k, v in used.items() if k != "machine"
        )
        used["steal"] = last.machine_steal - first.machine_steal
        used["seconds"] = last.time - first.time
        return used


def sample(root: int, driver_group: str) -> dict:
    """One sample as a JSON-ready dict; the sampling process itself is left out."""
    busy, steal = _machine_cpu()
    processes = {}
    for pid in _descendants(root):
        found = _process_cpu(pid) if pid != os.getpid() else None
        if found is not None:
            command, seconds = found
            processes[pid] = (driver_group if pid == root else _group(command), seconds)
    return {"t": time.time(), "busy": busy, "steal": steal, "p": processes}


def _group(command: str) -> str:
    for group, needles in GROUPS:
        if any(needle in command for needle in needles):
            return group
    return "other Ray processes"


def _machine_cpu() -> tuple[float, float]:
    fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # the fields after the command name


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, index = [root], 0
    while index < len(found):
        found += children.get(found[index], [])
        index += 1
    return found


def _process_cpu(pid: int) -> tuple[str, float] | None:
    fields = _stat(pid)
    try:
        command = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    if fields is None or not command:
        return None  # gone, or a zombie whose command line is already empty
    return command, (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


if __name__ == "__main__":
    root_pid, every_seconds, driver = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    while os.path.exists(f"/proc/{root_pid}"):
        print(json.dumps(sample(root_pid, driver)), flush=True)
        time.sleep(every_seconds)
