"""`memlab run`, the README's main command, as a new user runs it: a fresh process, its own Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from net_helpers import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_memlab_run_goes_from_data_to_a_served_session(tmp_path: Path):
    # One trial of a few steps: the point is the whole path, not the accuracy it reaches.
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "run",
        "--kind",
        "attention",
        "--memory-size",
        "32",
        "--threshold",
        "0.0",
        "--port",
        str(free_port()),
        "--ray-address",
        "local",  # a private Ray, like a new user's, even beside the test session's own
        "train.epochs=1",
        "train.max_steps_per_epoch=20",
        "data.num_train_examples=1024",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for stage in ("1/4 data", "2/4 sweep", "3/4 serve", "4/4 a session", "recalled"):
        assert stage in output, output[-4000:]
    # Served as a client meets it: whole rows and 8-token appends agree (the chunk contract).
    served = re.search(
        r"\(/v1/predict\) ([\d.]+), sessions appending 8 tokens a request ([\d.]+)", output
    )
    assert served, output[-4000:]
    assert abs(float(served[1]) - float(served[2])) <= 0.02, served[0]
    # memlab's own progress and summary only; Ray's and MLflow's lines went to the named log.
    assert len(output.splitlines()) <= 60, output
    log = tmp_path / output.split("framework logs (Ray, MLflow): ")[1].split()[0]
    assert log.resolve().parent == (tmp_path / "memlab_runs" / "logs").resolve()
    assert "ray" in log.read_text().lower()

    runs = tmp_path / "memlab_runs"
    assert (runs / "tune" / "main" / "report" / "results.csv").is_file()
    plot = runs / "tune" / "main" / "report" / "accuracy_vs_state_bytes.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("memlab-champion", "champion")
    assert champion.tags["mechanism"] == '"attention"'
    token = Path.home() / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o077 == 0  # the cluster's token is the owner's alone


def test_a_bad_override_fails_before_ray_starts(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "train.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "train.lr" in done.stdout + done.stderr
    assert not (tmp_path / "memlab_runs").exists()
