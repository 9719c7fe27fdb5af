"""Where the CPUs went during a span: a process tree's CPU time and the whole machine's, from /proc.

`bench_train.py` samples the tree under its own process (the driver, and the raylet, GCS and
dashboard it started, with every Ray worker under them) while a training run goes on, then reads
the CPU seconds each group of processes used between two wall-clock times (the first and last
logged step), beside what the machine's cores did in all: the rest is other users of a shared
machine. Linux only: elsewhere `TreeSampler.available()` is False and the benchmark says so.
"""

from __future__ import annotations

import os
import threading
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
    """Samples every `every` seconds in a thread until `stop()`."""

    def __init__(self, root: int, driver_group: str = "driver", every: float = 0.25) -> None:
        self.root, self.driver_group, self.every = root, driver_group, every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def available() -> bool:
        return (PROC / "stat").is_file()

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.every)

    def _sample(self) -> Sample:
        busy, steal = _machine_cpu()
        processes = {}
        for pid in _descendants(self.root):
            found = _process_cpu(pid)
            if found is not None:
                command, seconds = found
                group = self.driver_group if pid == self.root else _group(command)
                processes[pid] = (group, seconds)
        return Sample(time.time(), busy, steal, processes)

    def usage(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group between `start` and `end` (time.time()), with `machine` (all
        busy cores), `outside this run` (machine minus this tree) and `steal`."""
        inside = [s for s in self.samples if start <= s.time <= end]
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
