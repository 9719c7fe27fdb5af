"""Clusters: memlab jobs on a real Ray head with token auth, the shared MLflow server, cluster/.

The head is started here (`ray start --head --block`) on free ports, with its own temp dir and its
own token file, and stopped by terminating that process and its process group: never `ray stop`,
which would stop every Ray on the machine. The tests reach it only over HTTP, through memlab's CLI
and the Jobs API; nothing here calls `ray.init`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from net_helpers import free_port
from typer.testing import CliRunner

from pipelines import submit as jobs
from pipelines.cli import app
from pipelines.experiment import apply_overrides
from pipelines.recipes import RECIPES, recipe
from pipelines.train.driver import local_store_refusal
from pipelines.train.tracking import RUN_NAME_TAG

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent
# A few steps of the tiny GRU on one Train worker (like tests/test_train.py `_tiny`).
TINY = (
    "scaling.num_workers=1",
    "train.max_steps_per_epoch=2",
    "train.log_every_steps=1",
    "data.num_train_examples=128",
    "data.num_test_examples=32",
    "train.max_eval_batches=1",
)


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """Terminate a process we started in its own session, then anything left in its group."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


# ---- pure pieces: no cluster ----


def test_local_store_refusal_depends_on_the_uri_and_the_node_count():
    sqlite = "sqlite:////data/mlflow.db"
    assert local_store_refusal(sqlite, alive_nodes=1) is None
    assert local_store_refusal("http://mlflow:5000", alive_nodes=8) is None
    assert local_store_refusal("databricks", alive_nodes=8) is None
    message = local_store_refusal(sqlite, alive_nodes=3)
    assert "3 nodes" in message and "cluster/mlflow-server.sh" in message
    assert local_store_refusal("/abs/mlruns", alive_nodes=2) is not None
    assert local_store_refusal("file:///abs/mlruns", alive_nodes=2) is not None


def test_the_token_is_found_in_rays_order_and_never_shown(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "named"
    named.write_text("from-path")
    found = jobs.find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(named)}, home)
    assert found.secret.get_secret_value() == "from-env" and found.source == "RAY_AUTH_TOKEN"
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(named)}, home).source == f"file {named}"
    assert jobs.find_token({}, home).secret.get_secret_value() == "from-home"
    assert jobs.find_token({}, tmp_path / "nobody") is None
    assert "from-home" not in repr(jobs.find_token({}, home))
    with pytest.raises(jobs.SubmitError, match="cannot be read"):
        jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_entrypoint_and_runtime_env_for_this_machine_and_for_a_remote_cluster():
    spec = jobs.JobSpec(command="train", args=("--recipe", "debug-gru", "train.lr=1e-3"))
    local = jobs.entrypoint(spec, local=True, python="/venv/bin/python")
    assert local == (
        f"cd {shlex.quote(str(ROOT))} && /venv/bin/python -m pipelines.cli train "
        "--recipe debug-gru train.lr=1e-3"
    )
    assert jobs.entrypoint(spec, local=False).startswith("python -m pipelines.cli train")
    shared = spec.model_copy(update={"run_dir": "/mnt/memlab"})
    assert jobs.entrypoint(shared, local=False).startswith("cd /mnt/memlab && python -m")

    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "working_dir" not in jobs.runtime_env(spec, local=True, environ=environ)
    remote = jobs.runtime_env(spec.model_copy(update={"pip": True}), local=False, environ=environ)
    assert remote["working_dir"] == str(ROOT) and ".venv" in remote["excludes"]
    assert remote["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "torch==2.13.0" in remote["pip"]["packages"]
    assert not any(p.startswith("ray") for p in remote["pip"]["packages"])


def test_credentials_and_local_tracking_files_do_not_travel_to_a_remote_cluster():
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD"):
        jobs.JobSpec(command="train", env={"MLFLOW_TRACKING_PASSWORD": "x"})
    spec = jobs.JobSpec(command="train")
    environ = {"MLFLOW_TRACKING_URI": "sqlite:////home/me/mlflow.db"}
    with pytest.raises(jobs.SubmitError, match="cannot write to"):
        jobs.runtime_env(spec, local=False, environ=environ)
    assert jobs.runtime_env(spec, local=True, environ=environ)["env_vars"]["MLFLOW_TRACKING_URI"]
    assert jobs.redact("http://me:pw@mlflow:5000/x") == "http://***@mlflow:5000/x"


@pytest.mark.timeout(60)
def test_an_unreachable_address_is_a_clear_error():
    result = CliRunner().invoke(app, ["jobs", "list", "--address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "cannot reach the Ray Jobs API" in _flat(result.output)


# ---- cluster/: every file parses and carries what its kind needs ----


def _documents() -> list[tuple[Path, dict]]:
    files = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")])
    return [(path, doc) for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def _ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": None}[
        doc["kind"]
    ] or spec["rayClusterConfig"]


def _check_ray_cluster(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication off"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head exposed"
    assert head["template"]["spec"]["containers"][0]["image"], where
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert group["template"]["spec"]["containers"][0]["image"], where


def _check_k8s(doc: dict, where: str) -> None:
    kind, spec = doc["kind"], doc.get("spec", {})
    assert doc["apiVersion"] and doc["metadata"]["name"], where
    if kind in ("RayCluster", "RayJob", "RayService"):
        assert doc["apiVersion"] == "ray.io/v1", where
        _check_ray_cluster(_ray_cluster_spec(doc), where)
    if kind == "RayJob":
        assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True, where
    if kind == "RayService":
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    if kind in ("Deployment", "StatefulSet"):
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), where
    if kind == "Service":
        assert spec["ports"] and spec["selector"], where
        assert spec.get("type", "ClusterIP") == "ClusterIP", f"{where}: exposed beyond the cluster"
    if kind == "PersistentVolumeClaim":
        assert spec["accessModes"] and spec["resources"]["requests"]["storage"], where
    if kind == "NetworkPolicy":
        assert "podSelector" in spec and spec["ingress"], where


def _env_entries(node) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_entries(item)


@pytest.mark.timeout(60)
def test_every_yaml_in_cluster_parses_and_carries_what_its_kind_needs():
    documents = _documents()
    kinds = {doc.get("kind") for _, doc in documents}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "NetworkPolicy"} <= kinds
    for path, doc in documents:
        where = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if "kind" in doc:
            _check_k8s(doc, where)
        elif "provider" in doc:
            assert doc["cluster_name"], where  # the launcher file: next test
        else:
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(doc)  # serve-config.yaml
        for entry in _env_entries(doc):
            if any(mark in entry["name"] for mark in jobs.SECRET_MARKERS):
                assert "value" not in entry, f"{where}: {entry['name']} written in the file"


@pytest.mark.timeout(60)
def test_the_launcher_yaml_passes_rays_own_schema_with_auth_and_a_loopback_dashboard():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _worker_resources(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _sweep_config(entrypoint: str):
    """The experiment config the RayJob's `memlab tune` command line trains in every trial."""
    words = shlex.split(entrypoint.split("&&")[-1])
    rest = words[words.index("tune") + 1 :]
    overrides = [w for w in rest if "=" in w and not w.startswith("-")]
    return apply_overrides(recipe(rest[rest.index("--recipe") + 1]), overrides)


@pytest.mark.timeout(60)
def test_kuberay_resources_match_what_memlab_asks_of_ray():
    docs = {doc["kind"]: doc for _, doc in _documents() if "kind" in doc}
    sweep = docs["RayJob"]["spec"]
    scaling = _sweep_config(sweep["entrypoint"]).scaling
    per_trial = scaling.num_workers * scaling.gpus_per_worker
    (gpu_group,) = sweep["rayClusterSpec"]["workerGroupSpecs"]
    pod = _worker_resources(gpu_group)
    gpus = gpu_group["minReplicas"] * float(pod["nvidia.com/gpu"])
    assert scaling.use_gpu and float(pod["nvidia.com/gpu"]) >= scaling.gpus_per_worker
    # Every GPU is there when the sweep starts and counts them (concurrent_trials): whole trials.
    assert gpu_group["minReplicas"] == gpu_group["maxReplicas"]
    assert gpus >= per_trial and gpus % per_trial == 0
    assert _cpus(pod["cpu"]) >= scaling.cpus_per_worker + 0.01  # a Train worker + a trial driver

    (autoscaled,) = docs["RayCluster"]["spec"]["workerGroupSpecs"]
    widest = max(make().scaling.num_workers for make in RECIPES.values())
    assert autoscaled["maxReplicas"] * float(_worker_resources(autoscaled)["nvidia.com/gpu"]) >= (
        widest * scaling.gpus_per_worker
    )


@pytest.mark.timeout(60)
def test_the_rayservice_serves_the_serve_config_application():
    service = next(doc for _, doc in _documents() if doc.get("kind") == "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service is ClusterIP
    (app_,) = served["applications"]
    assert app_["import_path"] == "serve.app:build_app"
    assert app_["args"]["tracking_uri"].startswith("http://")
    config = CLUSTER / "serve-config.yaml"
    if not config.exists():
        pytest.skip("cluster/serve-config.yaml not written yet")
    (reference,) = yaml.safe_load(config.read_text())["applications"]
    mine = app_ | {"args": {k: v for k, v in app_["args"].items() if k != "tracking_uri"}}
    assert mine == reference, "rayservice.yaml's application drifted from serve-config.yaml"
    # The key: the secret memlab-serve mounted where the application's api_key_file points.
    assert app_["args"]["api_key_file"] == "~/.memlab/api_key"
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        spec = pod["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "api-key"]
        assert volume["secret"]["secretName"] == "memlab-serve"
        assert volume["secret"]["items"] == [{"key": "api-key", "path": "api_key"}]
        for container in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["api-key"] == "/home/ray/.memlab"


# ---- a real head with token authentication ----


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard: the Jobs API and `serve deploy`
    token_path: Path
    token: str
    gcs: str  # what a driver joins (`ray.init(address=...)`, `--ray-address`)

    def env(self, **extra: str | None) -> dict[str, str | None]:
        """The environment a memlab client needs: the token's file, no other token source, and
        no tracking URI left in this process's environment by an earlier test (MLflow's
        `set_tracking_uri` exports it)."""
        isolated = {"RAY_AUTH_TOKEN": None, "MLFLOW_TRACKING_URI": None}
        return {"RAY_AUTH_TOKEN_PATH": str(self.token_path), **isolated} | extra


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    # A short root: Ray's Unix socket paths under --temp-dir must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="memlab-ray-", dir="/tmp"))
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    try:
        process, head = _start_head(root, token_path)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield head
    finally:
        _stop_group(process, grace_s=20)
        shutil.rmtree(root, ignore_errors=True)


def _start_head(root: Path, token_path: Path) -> tuple[subprocess.Popen, Head]:
    """A head with token auth, up. One retry: on 2 cores shared with other test runs its GCS has
    missed Ray's own start-up deadline; failing twice is a real failure."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {
        "RAY_AUTH_MODE": "token",  # on, whatever ~/.ray holds
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no 30 s drain when the test stops it
        # `python` on this head is the venv's, as on a cluster image with memlab's dependencies,
        # so the remote form of a job (uploaded project, plain `python`) runs here too.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for attempt in (1, 2):
        dashboard, gcs, log = free_port(), free_port(), root / f"head-{attempt}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                _head_command(root, dashboard, gcs), env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        address = f"http://127.0.0.1:{dashboard}"
        head = Head(address, token_path, token_path.read_text(), f"127.0.0.1:{gcs}")
        if _came_up(head, process):
            return process, head
        _stop_group(process, grace_s=5)
    pytest.fail(f"the head did not come up twice:\n{log.read_text()[-3000:]}")


def _head_command(root: Path, dashboard: int, gcs: int) -> list[str]:
    ports = {
        "--port": gcs,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    return [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--dashboard-host=127.0.0.1",  # the dashboard and Jobs API on loopback only
        *(f"{flag}={port}" for flag, port in ports.items()),
        # 4 logical CPUs on 2 cores: a Train worker, Data tasks and the driver all fit.
        "--num-cpus=4", f"--object-store-memory={256 * 1024**2}",
        f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
    ]  # fmt: skip


def _came_up(head: Head, process: subprocess.Popen, timeout_s: float = 150) -> bool:
    """Up: the Jobs API answers and the head's own node is registered (before that, jobs
    would start but `memlab submit` could not yet tell where the cluster is)."""
    headers = {"Authorization": f"Bearer {head.token}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(requests.RequestException, ValueError, KeyError):
            jobs_api = requests.get(f"{head.address}/api/jobs/", headers=headers, timeout=5)
            nodes = requests.get(f"{head.address}/api/v0/nodes", headers=headers, timeout=5)
            if jobs_api.ok and nodes.json()["data"]["result"]["total"] > 0:
                return True
        time.sleep(1.0)
    return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real tracking server from cluster/mlflow-server.sh: SQLite in tmp, loopback (default)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = os.environ | {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
        "MLFLOW_PORT": str(port),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        ["bash", str(CLUSTER / "mlflow-server.sh")], env=env, cwd=root, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, root / "server.log")
        yield url
    finally:
        _stop_group(process, grace_s=10)
        log.close()


def _wait_for_health(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow-server.sh exited {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=5).ok:
                return
        time.sleep(0.5)
    pytest.fail(f"the MLflow server did not answer in 90 s:\n{log.read_text()[-3000:]}")


def _memlab(args: list[str], env: dict[str, str | None]):
    return CliRunner().invoke(app, args, env=env)


@pytest.mark.ray
@pytest.mark.timeout(420)  # the first test of the module also waits for the head to start
def test_a_submission_without_the_token_or_with_a_wrong_one_is_refused(ray_head, tmp_path):
    nobody = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None}
    refused = _memlab(["submit", "--address", ray_head.address, "--", "train"], nobody)
    assert refused.exit_code == 1
    assert "requires a token (HTTP 401)" in _flat(refused.output)

    wrong = _memlab(["jobs", "list", "-a", ray_head.address], {"RAY_AUTH_TOKEN": "not-it"})
    assert wrong.exit_code == 1
    assert "refused the token from RAY_AUTH_TOKEN (HTTP 403)" in _flat(wrong.output)
    assert "not-it" not in wrong.output


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_failed_job_reports_its_exit_status_and_the_tail_of_its_log(ray_head, tmp_path):
    """In the remote form: the project uploaded, the cluster's `python`, run in --run-dir."""
    env = ray_head.env(RAY_API_SERVER_ADDRESS=ray_head.address)
    args = ["--recipe", "debug-gru", "model.memory.memroy_size=3"]
    remote = ["--where", "remote", "--run-dir", str(tmp_path)]
    submit = ["submit", *remote, "--submission-id", "memlab-test-fails", "--", "train", *args]
    result = _memlab(submit, env)
    output = _flat(result.output)
    assert result.exit_code == 1, output
    assert "remote, project uploaded" in output and "memroy_size" in output  # the streamed log
    assert "memlab-test-fails FAILED (exit status 2): Job entrypoint command failed" in output

    status = _flat(_memlab(["jobs", "status", "memlab-test-fails"], env).output)
    assert "FAILED (exit status 2)" in status and "last 30 lines of its log" in status
    assert "memroy_size" in status
    client = jobs.connect(jobs.ClusterSettings(address=ray_head.address), _token(ray_head))
    details = jobs.job_details(client, "memlab-test-fails")
    assert details.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    assert details.entrypoint.startswith(f"cd {tmp_path} && python -m pipelines.cli train")


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_stopping_a_job(ray_head, tmp_path):
    env = ray_head.env(RAY_API_SERVER_ADDRESS=ray_head.address)
    args = ["--recipe", "debug-gru", "train.epochs=100", *TINY, *_outputs(tmp_path)]
    submitted = _memlab(
        ["submit", "--no-wait", "--submission-id", "memlab-test-stop", "--", "train", *args], env
    )
    assert submitted.exit_code == 0, submitted.output
    client = jobs.connect(jobs.ClusterSettings(address=ray_head.address), _token(ray_head))
    _wait_for_status(client, "memlab-test-stop", {"RUNNING"})
    stopped = _memlab(["jobs", "stop", "memlab-test-stop", "--timeout", "60"], env)
    assert stopped.exit_code == 0, stopped.output
    assert "memlab-test-stop STOPPED" in _flat(stopped.output)
    assert "STOPPED" in _memlab(["jobs", "status", "memlab-test-stop"], env).output


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_submit_trains_on_the_cluster_and_logs_to_the_mlflow_server(
    ray_head, mlflow_server, tmp_path
):
    env = os.environ | {
        "RAY_AUTH_TOKEN_PATH": str(ray_head.token_path),
        "MLFLOW_TRACKING_URI": mlflow_server,  # passed on to the job by `memlab submit`
        "HOME": str(tmp_path),  # no ~/.ray/auth_token of the user's in play
    }
    env.pop("RAY_AUTH_TOKEN", None)
    args = ["--recipe", "debug-gru", "--name", "cluster-pulse", *TINY, *_outputs(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "submit", "-a", ray_head.address, "--", "train",
         *args],
        env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert ray_head.token not in output
    job_id = output.split("submitted ", 1)[1].split()[0]
    assert f"done {job_id} SUCCEEDED exit 0" in _flat(output)

    run = _the_run(mlflow_server, "cluster-pulse")
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id)}
    assert {"experiment.json", "checkpoint"} <= artifacts  # uploaded through the server
    client_env = ray_head.env(RAY_API_SERVER_ADDRESS=ray_head.address)
    assert run.info.run_id in _memlab(["jobs", "logs", job_id], client_env).output
    listed = _flat(_memlab(["jobs", "list"], client_env).output)
    assert f"{job_id} SUCCEEDED exit 0" in listed and "train --recipe debug-gru" in listed


def _outputs(tmp_path: Path) -> list[str]:
    """Checkpoints and the data cache in tmp, not in the project's memlab_runs/."""
    return [f"run.storage_path={tmp_path / 'ray'}", f"data.cache_dir={tmp_path / 'data'}"]


def _token(head: Head) -> jobs.Token:
    return jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(head.token_path)})


def _wait_for_status(client, job_id: str, wanted: set[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if str(jobs.job_details(client, job_id).status) in wanted:
            return
        time.sleep(0.5)
    pytest.fail(f"job {job_id} never reached {wanted}")


def _the_run(tracking_uri: str, name: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("memlab")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'"
    )
    return run


def _ray_cli_env(head: Head, **extra: str) -> dict[str, str]:
    """What Ray's own CLI (`ray job`, `serve`) needs for a head with token authentication."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    return env | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(head.token_path),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_memlab_train_joins_a_running_head_instead_of_failing(ray_head, tmp_path):
    """With a head running, `memlab train` joins it (one line says so) and trains there."""
    env = _ray_cli_env(ray_head, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["--recipe", "debug-gru", "--name", "joined", *TINY, *_outputs(tmp_path)]
    command = [sys.executable, "-m", "pipelines.cli", "train", "--ray-address", ray_head.gcs]
    done = subprocess.run(
        [*command, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"joined the Ray cluster at {ray_head.gcs}" in _flat(output)
    assert "Traceback" not in output and "num_cpus" not in output


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_plain_ray_job_is_refused_when_its_results_would_vanish(ray_head, tmp_path):
    """`ray job submit --working-dir .` runs in a copy deleted at `ray stop`: the default store
    and checkpoints there are refused with the fix, not written and lost."""
    env = _ray_cli_env(ray_head, RAY_ADDRESS=ray_head.address)
    entrypoint = "python -m pipelines.cli train --recipe debug-gru"
    submit = [
        str(VENV_BIN / "ray"), "job", "submit", "--working-dir", str(ROOT),
        "--submission-id", "memlab-test-vanish", "--", *entrypoint.split(),
    ]  # fmt: skip
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=280)
    output = _flat(done.stdout + done.stderr)
    assert done.returncode != 0, output[-3000:]
    assert "deleted at `ray stop`" in output and "MLFLOW_TRACKING_URI" in output
    assert "Traceback" not in output.split("memlab-test-vanish", 1)[-1]


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_serve_deploy_takes_the_key_from_a_file_and_refuses_an_open_port_without_one(
    ray_head, tmp_path
):
    """Serve's own CLI: the config names a key file on the cluster; without a key, a proxy beyond
    loopback makes the application refuse to start."""
    import torch

    from pipelines.checkpoint import Position, save_checkpoint
    from pipelines.recipes import debug

    config = debug("gru")
    model = config.model.build()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    save_checkpoint(tmp_path / "model", model, optimizer, scheduler, Position(), config)
    key_file = tmp_path / "api_key"
    key_file.write_text(secrets.token_hex(16))
    key_file.chmod(0o600)
    port = free_port()
    env = _ray_cli_env(ray_head)
    serve_cli = [str(VENV_BIN / "serve")]

    def deploy(args: dict) -> None:
        document = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
        document["http_options"] |= {"host": "0.0.0.0", "port": port}  # an open port
        (application,) = document["applications"]
        application["args"] = {"model_uri": str(tmp_path / "model"), **args}
        application["deployments"][0]["autoscaling_config"] |= {"max_replicas": 1}
        application["deployments"][0]["ray_actor_options"] = {"num_cpus": 0.5}
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(document))
        command = [*serve_cli, "deploy", str(path), "--address", ray_head.address]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        deploy({})
        message = _wait_for_app(serve_cli, env, ray_head, {"DEPLOY_FAILED"})
        assert "refusing to serve on '0.0.0.0' without an API key" in message

        deploy({"api_key_file": str(key_file)})
        _wait_for_app(serve_cli, env, ray_head, {"RUNNING"})
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/model", timeout=10).status_code == 401
        assert requests.get(f"{url}/openapi.json", timeout=10).status_code == 401
        keyed = {"X-API-Key": key_file.read_text()}
        assert requests.get(f"{url}/v1/model", headers=keyed, timeout=10).status_code == 200
    finally:
        subprocess.run(
            [*serve_cli, "shutdown", "--yes", "--address", ray_head.address],
            env=env, capture_output=True, timeout=120,
        )  # fmt: skip


def _wait_for_app(serve_cli, env, head: Head, wanted: set[str], timeout_s: float = 240) -> str:
    """Poll `serve status` until the application reaches one of `wanted`; its status report,
    its deployments' messages included."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        command = [*serve_cli, "status", "--address", head.address]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        with contextlib.suppress(yaml.YAMLError, TypeError, KeyError):
            status = yaml.safe_load(done.stdout)["applications"]["memlab"]
            if status["status"] in wanted:
                return _flat(yaml.safe_dump(status, width=10_000))
        time.sleep(2)
    pytest.fail(f"the application never reached {wanted}: {status}")
