"""`memlab submit` and `memlab jobs`: memlab commands as Ray jobs, through the Ray Jobs API.

A job runs one memlab command (`train`, `tune` or `prep`) as its entrypoint, on the cluster's
head. How the entrypoint is written depends on where the cluster is:

- on this machine (every alive node has one of this machine's addresses): this interpreter,
  `<sys.executable> -m pipelines.cli ...`, run in the project folder. A job starts from the
  raylet's environment, whose `python` may well be the system one, and relative outputs
  (`memlab_runs/`) land where `memlab train` would have put them.
- elsewhere: the project folder is uploaded as the job's `working_dir` and the entrypoint is
  `python -m pipelines.cli ...`, the interpreter of the cluster's image. Ray puts the uploaded
  folder first on the import path, so a job runs the code as it was when it was submitted.

The token of Ray's token authentication is found the way Ray finds it (`RAY_AUTH_TOKEN`, else the
file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`) and travels only in the
Authorization header: never on a command line, in a job's environment or in anything printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient
from ray.util import get_node_ip_address

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never uploaded: environments, caches and outputs (Ray also honours .gitignore).
UPLOAD_EXCLUDES = [".venv", ".git", "memlab_runs", "mlruns", "**/__pycache__", "*.egg-info"]
# Names that hold credentials go to the cluster as secrets, not as job environment (which Ray
# stores with the job and shows in `ray job list` and the dashboard).
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
TUNNEL_HINT = (
    "For a remote cluster open a tunnel first: `kubectl -n memlab port-forward "
    "svc/memlab-head-svc 8265:8265` (KubeRay) or `ray dashboard cluster/aws.yaml` (launcher)"
)


class SubmitError(RuntimeError):
    """A submission or a job query that failed; the message says why and what to do."""


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClusterSettings(Strict):
    """Where the Jobs API (the Ray dashboard) is. The default is loopback: a remote cluster is
    reached through a tunnel to it, never through a port opened to the network."""

    address: str = DEFAULT_ADDRESS
    timeout_s: float = Field(default=10.0, gt=0, description="per HTTP request")

    @field_validator("address")
    @classmethod
    def _http_url(cls, address: str) -> str:
        address = address.strip().rstrip("/")
        if "://" not in address:
            address = f"http://{address}"
        if urlsplit(address).scheme not in ("http", "https"):
            raise ValueError(
                f"address {address!r} is not the Jobs API: give the dashboard's http://host:port "
                f"(default {DEFAULT_ADDRESS}), not a ray:// or GCS address"
            )
        return address


class JobSpec(Strict):
    """One memlab command to run as a Ray job.

    `placement`: `local` runs it with this interpreter in this project folder, `remote` uploads
    the project and uses the cluster's `python`, `auto` asks the cluster which one it is.
    `pip`: also install the project's dependencies into the job's environment (remote only;
    by default the cluster image already has them, see cluster/Dockerfile).
    `run_dir`: the folder the command runs in, so relative outputs (`memlab_runs/`) land there;
    on a multi-node cluster a mount every node shares (the manifests mount /mnt/memlab).
    """

    command: Literal["train", "tune", "prep"]
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    placement: Literal["auto", "local", "remote"] = "auto"
    pip: bool = False
    run_dir: str | None = None
    submission_id: str | None = None

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        secret = sorted(k for k in env if any(m in k.upper() for m in SECRET_MARKERS))
        if secret:
            raise ValueError(
                f"these look like credentials: {', '.join(secret)}. A job's environment is "
                "stored with the job and shown by `memlab jobs` and the dashboard; give them to "
                "the cluster as secrets instead (a Kubernetes Secret, see cluster/README.md)"
            )
        return env


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it came from; only `source` is ever shown."""

    secret: SecretStr
    source: str

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret.get_secret_value()}"}


def find_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token in Ray's own order of precedence, or None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(SecretStr(environ["RAY_AUTH_TOKEN"].strip()), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return _token_file(Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), required=True)
    return _token_file((home or Path.home()) / ".ray" / "auth_token", required=False)


def _token_file(path: Path, required: bool) -> Token | None:
    try:
        value = path.read_text().strip()
    except OSError as error:
        if not required:
            return None
        raise SubmitError(
            f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read: {error.strerror}"
        ) from None
    if not value:
        if required:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH names {path}, which is empty")
        return None
    return Token(SecretStr(value), f"file {path}")


def connect(cluster: ClusterSettings, token: Token | None) -> JobSubmissionClient:
    """A Jobs API client, after one short request that turns every way of failing to reach the
    cluster into a message naming the cause (the SDK's own errors come late or not at all)."""
    headers = token.header() if token else {}
    _check_reachable(cluster, headers, token)
    try:
        return JobSubmissionClient(cluster.address, headers=headers)
    except Exception as error:  # the SDK raises bare RuntimeError/ConnectionError
        raise SubmitError(f"cannot open the Jobs API at {cluster.address}: {error}") from None


def _check_reachable(cluster: ClusterSettings, headers: dict, token: Token | None) -> None:
    url = f"{cluster.address}/api/version"
    try:
        response = requests.get(url, headers=headers, timeout=cluster.timeout_s)
    except requests.exceptions.RequestException as error:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {cluster.address} ({type(error).__name__}). Is the "
            f"head running, and is this its dashboard port? {TUNNEL_HINT}"
        ) from None
    _explain_status(cluster.address, response, token)


def _explain_status(address: str, response: requests.Response, token: Token | None) -> None:
    if response.status_code == 401:
        raise SubmitError(
            f"the cluster at {address} requires a token (HTTP 401) and none was found: set "
            "RAY_AUTH_TOKEN_PATH to the token's file (or put it in ~/.ray/auth_token); "
            "cluster/README.md says where each kind of cluster keeps it"
        )
    if response.status_code == 403:
        source = token.source if token else "the request"
        raise SubmitError(
            f"the cluster at {address} refused the token from {source} (HTTP 403): it is not "
            "this cluster's token"
        )
    if response.status_code != 200 or "ray_version" not in response.text:
        raise SubmitError(
            f"{address} answered HTTP {response.status_code} but is not a Ray dashboard; "
            f"give the dashboard's address (default {DEFAULT_ADDRESS})"
        )


def on_this_machine(cluster: ClusterSettings, token: Token | None, attempts: int = 5) -> bool:
    """Whether every alive node of the cluster is this machine (a local `ray start --head`).

    A loopback address alone does not say so: a tunnel to a remote cluster is loopback too.
    Unknown (no answer) counts as remote; that form also works on a local cluster started from
    an activated environment.
    """
    for attempt in range(attempts):
        alive = _alive_node_addresses(cluster, token)
        if alive is None:
            return False
        if alive:
            return alive <= _this_machine_addresses()
        # A head that has just started answers before its own node is in the dashboard's table.
        time.sleep(min(2.0, 0.5 * 2**attempt))
    return False


def _alive_node_addresses(cluster: ClusterSettings, token: Token | None) -> set[str] | None:
    headers = token.header() if token else {}
    try:
        response = requests.get(
            f"{cluster.address}/api/v0/nodes", headers=headers, timeout=cluster.timeout_s
        )
        nodes = response.json()["data"]["result"]["result"]
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError):
        return None
    return {node["node_ip"] for node in nodes if node.get("state") == "ALIVE"}


def _this_machine_addresses() -> set[str]:
    addresses = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):  # a host name without DNS: the other sources remain
        addresses.update(socket.gethostbyname_ex(socket.gethostname())[2])
    addresses.add(get_node_ip_address())  # the address Ray itself gives this node
    return addresses


def entrypoint(spec: JobSpec, local: bool, python: str = sys.executable) -> str:
    """The job's shell command. Local: this interpreter in the project (or `run_dir`); remote:
    the cluster's `python`, importing the uploaded project."""
    command = [python if local else "python", "-m", "pipelines.cli", spec.command, *spec.args]
    run_dir = spec.run_dir or (str(PROJECT_ROOT) if local else None)
    prefix = f"cd {shlex.quote(run_dir)} && " if run_dir else ""
    return prefix + shlex.join(command)


def runtime_env(spec: JobSpec, local: bool, environ: Mapping[str, str] | None = None) -> dict:
    """The job's runtime environment: its variables, and for a remote cluster the project as
    `working_dir` (and, with `pip`, the project's dependencies)."""
    env_vars = {"PYTHONUNBUFFERED": "1"} | _tracking_env(local, environ) | spec.env
    env: dict[str, Any] = {"env_vars": env_vars}
    if not local:
        env |= {"working_dir": str(PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES}
    if spec.pip and not local:
        env["pip"] = {"packages": project_dependencies(), "pip_check": False}
    return env


def _tracking_env(local: bool, environ: Mapping[str, str] | None) -> dict[str, str]:
    """This shell's MLFLOW_TRACKING_URI, when it makes sense on the cluster."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return {}  # the cluster's own (the manifests set it), else memlab's default
    if not local and _is_local_store(uri):
        raise SubmitError(
            f"MLFLOW_TRACKING_URI={redact(uri)} is a file on this machine, which a remote "
            "cluster cannot write to: start the shared tracking server "
            "(cluster/mlflow-server.sh) and point MLFLOW_TRACKING_URI at it, or unset it to "
            "use the cluster's"
        )
    return {"MLFLOW_TRACKING_URI": uri}


def _is_local_store(uri: str) -> bool:
    # Imported here: the driver module loads torch and Ray Train, seconds a submit rarely needs.
    from pipelines.train.driver import is_local_store

    return is_local_store(uri)


def project_dependencies() -> list[str]:
    """pyproject's dependencies minus Ray: the cluster runs its own Ray, and a second one in a
    job's environment is refused by Ray."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return [d for d in project["dependencies"] if not d.replace(" ", "").startswith("ray")]


def submit(client: JobSubmissionClient, spec: JobSpec, local: bool) -> str:
    """Submit `spec`; returns its submission id."""
    env = runtime_env(spec, local)
    shown = shlex.join([spec.command, *spec.args])
    return _call(
        lambda: client.submit_job(
            entrypoint=entrypoint(spec, local),
            runtime_env=env,
            submission_id=spec.submission_id,
            metadata={"memlab_command": shown},
        ),
        "submit the job",
    )


def follow(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> JobDetails:
    """Stream the job's log to `write` until it ends; return its final details."""

    async def pump() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    # The SDK logs every stream's close at INFO, into the middle of the job's own output.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    try:
        asyncio.run(pump())
    except Exception as error:  # a dropped stream must not hide how the job ended
        write(f"\n[memlab] log stream closed early ({error}); waiting for the job to end\n")
    return wait(client, job_id)


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float | None = None) -> JobDetails:
    """Poll until the job reaches a terminal state (or `timeout_s` passes); its details."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        details = job_details(client, job_id)
        if details.status.is_terminal():
            return details
        if deadline is not None and time.monotonic() > deadline:
            return details
        time.sleep(1.0)


def job_details(client: JobSubmissionClient, job_id: str) -> JobDetails:
    return _call(lambda: client.get_job_info(job_id), f"find job {job_id}")


def job_logs(client: JobSubmissionClient, job_id: str) -> str:
    return _call(lambda: client.get_job_logs(job_id), f"read the log of job {job_id}")


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    jobs = _call(client.list_jobs, "list jobs")
    return sorted(jobs, key=lambda job: job.start_time or 0)


def stop(client: JobSubmissionClient, job_id: str, timeout_s: float = 30.0) -> JobDetails:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); its final details."""
    _call(lambda: client.stop_job(job_id), f"stop job {job_id}")
    details = wait(client, job_id, timeout_s)
    if not details.status.is_terminal():
        raise SubmitError(f"job {job_id} is still {details.status} {timeout_s:.0f} s after stop")
    return details


def _call(action: Callable[[], Any], what: str) -> Any:
    try:
        return action()
    except (RuntimeError, ConnectionError, requests.exceptions.RequestException) as error:
        text = str(error)
        if "status code 404" in text or "does not exist" in text:
            raise SubmitError(f"could not {what}: no such job on this cluster") from None
        raise SubmitError(f"could not {what}: {text}") from None


def summary(details: JobDetails) -> str:
    """One line: id, status, exit status, duration and the memlab command."""
    exit_status = "" if details.driver_exit_code is None else f"exit {details.driver_exit_code}"
    command = (details.metadata or {}).get("memlab_command", details.entrypoint)
    return "  ".join(
        part
        for part in (
            details.submission_id or details.job_id or "?",
            str(details.status),
            exit_status,
            _duration(details),
            command,
        )
        if part
    )


def _duration(details: JobDetails) -> str:
    if not details.start_time:
        return ""
    end_ms = details.end_time or time.time() * 1000
    seconds = int((end_ms - details.start_time) / 1000)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def verdict(details: JobDetails) -> str:
    """`job <id> FAILED (exit status 2): <Ray's message>`."""
    exit_status = details.driver_exit_code
    head = f"job {details.submission_id} {details.status}" + (
        f" (exit status {exit_status})" if exit_status is not None else ""
    )
    # Ray's message goes on with the log's tail ("..., last available logs (truncated ...):"),
    # which is shown separately.
    message = (details.message or "no message from Ray").strip().splitlines() or [""]
    return f"{head}: {message[0].split(', last available logs')[0]}"


def failure_report(details: JobDetails, logs: str, lines: int = 30) -> str:
    """Why a job did not succeed: the verdict, then the last `lines` lines of its log."""
    tail = "\n".join(logs.rstrip().splitlines()[-lines:]) or "(the job wrote no log)"
    return f"{verdict(details)}\n--- last {lines} lines of its log ---\n{tail}"


def redact(uri: str) -> str:
    """`uri` without a user or password, for printing."""
    parts = urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_success(details: JobDetails) -> bool:
    return details.status == JobStatus.SUCCEEDED
