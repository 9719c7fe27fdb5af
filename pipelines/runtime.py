"""Which Ray a command runs on, by one rule (`RAY_ADDRESS_HELP`), and a private one when needed.

- Ray already initialised in this process: use it.
- An address (`--ray-address`, else `RAY_ADDRESS`, which Ray sets inside a job): join that cluster.
- `local`: start a private cluster for this command, on loopback, and stop it at the end.
- `auto` (the default): join the cluster running on this machine (`ray start --head`) when there
  is exactly one, saying so in one line; start a private one when there is none; refuse, naming
  them, when there are several, since memlab cannot know which one is meant.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

AUTO = "auto"
LOCAL = "local"
RAY_ADDRESS_HELP = (
    "Ray cluster to run on: 'auto' joins the cluster running on this machine (ray start --head) "
    "if there is one, else starts a private one on loopback; 'local' always starts a private "
    "one; or an address (host:6379, ray://host:10001). Default: RAY_ADDRESS, else auto."
)


class RayConnectError(RuntimeError):
    """No Ray cluster could be joined or started; the message says why and what to do."""


class VanishingOutputs(ValueError):
    """Results would be written where they are deleted when the job's cluster stops."""


def job_working_dir(cwd: Path | None = None) -> Path | None:
    """The working directory when this process runs in Ray's unpacked copy of a job's
    `--working-dir` (under the session's `runtime_resources/`, deleted at `ray stop`), else None."""
    cwd = (cwd or Path.cwd()).resolve()
    return cwd if "runtime_resources" in cwd.parts else None


def local_store_file(tracking_uri: str) -> Path | None:
    """The file or folder a local MLflow store writes to (`sqlite:///...`, `file:...`, a bare
    path), None for a server."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if tracking_uri.startswith(scheme):
            return Path(tracking_uri.removeprefix(scheme))
    return None if "://" in tracking_uri else Path(tracking_uri)


def refuse_vanishing_outputs(outputs: dict[str, Path], cwd: Path | None = None) -> None:
    """Inside a job's temporary working directory, refuse outputs that resolve under it
    (`outputs`: what each is called -> where it would go), naming the one-line fix."""
    working = job_working_dir(cwd)
    if working is None:
        return
    doomed = [name for name, path in outputs.items() if path.resolve().is_relative_to(working)]
    if doomed:
        raise VanishingOutputs(
            f"this Ray job runs in Ray's temporary copy of the project ({working}), deleted at "
            f"`ray stop`: {', '.join(doomed)} would vanish with it. Point MLFLOW_TRACKING_URI at "
            "a tracking server (cluster/mlflow-server.sh) and add run.storage_path=/shared/dir "
            "data.cache_dir=/shared/dir/data, or submit with `memlab submit --run-dir /shared/dir`"
        )


@dataclass(frozen=True)
class RayRuntime:
    """The cluster a command runs on. `private`: started by this process, which stops it."""

    private: bool
    description: str

    def shutdown(self) -> None:
        if self.private and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None = None, say: Callable[[str], None] | None = None) -> RayRuntime:
    """Join or start Ray by the module's rule; `say` gets the one line that tells which."""
    say = say or (lambda _line: None)
    if ray.is_initialized():
        return RayRuntime(False, "the Ray this process already uses")
    target = address or os.environ.get("RAY_ADDRESS") or AUTO
    if target == AUTO:
        target = _the_local_cluster() or LOCAL
    if target == LOCAL:
        start_private()
        runtime = RayRuntime(True, "a private Ray on this machine (loopback, stopped at the end)")
    else:
        _join(target)
        runtime = RayRuntime(False, f"the Ray cluster at {target}")
        say(f"joined {runtime.description}")
    return runtime


def _the_local_cluster() -> str | None:
    """The address of the one Ray cluster running on this machine, None when there is none."""
    from ray._private.services import find_gcs_addresses  # no public equivalent in Ray 2.60

    running = sorted(find_gcs_addresses())
    if len(running) > 1:
        raise RayConnectError(
            f"{len(running)} Ray clusters run on this machine ({', '.join(running)}): choose one "
            "with --ray-address ADDRESS, or --ray-address local for a private one"
        )
    return running[0] if running else None


def _join(address: str) -> None:
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayConnectError(
            f"cannot join the Ray cluster at {address}: {error}. Check the address (ray status "
            "shows it) and, with token authentication, that RAY_AUTH_MODE=token is set and the "
            "token is in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH"
        ) from None


def start_private(log_to_driver: bool = True) -> None:
    """A Ray for this process only: loopback dashboard, token auth on, the token owner-only.

    At least 4 logical CPUs: fractional Train workers, Ray Data tasks and a Tune driver all fit
    on a 2-core laptop without anyone waiting forever for a CPU.

    Its GCS port is chosen here and every process of the cluster inherits `RAY_ADDRESS` naming
    it: Ray Train's placement-group cleaner finds its cluster by that variable, else by scanning
    the machine, which fails when other Ray instances run here ("Found multiple active Ray
    instances"); a trial ASHA stopped early then kept its CPUs and later trials waited forever.
    """
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    with _environment({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": address}):
        ray.init(
            address="local",  # a new cluster even when a head runs here (else Ray may join it)
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=True,  # Train's placement-group cleanup needs the state API
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
        )
    private_token()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment for the block (the processes Ray starts in it
    keep them), the previous values after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def private_token() -> None:
    """`ray.init` writes the cluster's auth token readable by every local user (mode 644 seen):
    only the owner should be able to reach the cluster with it."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        token.chmod(0o600)
