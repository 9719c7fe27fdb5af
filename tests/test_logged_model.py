"""A registered model loads where memlab is not installed: `mlflow.pyfunc` and `mlflow.pytorch` in
a fresh interpreter whose import path holds neither the repository nor memlab's install, at any
sequence length, from its logged requirements and shipped code alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.experiment import apply_overrides
from pipelines.recipes import debug
from pipelines.train.publish import publish

ROOT = Path(__file__).resolve().parents[1]

# Runs in the fresh interpreter: memlab's editable-install finder and the repository are taken
# off the import path before MLflow loads anything, so only the model's `code/` folder remains.
ISOLATED_LOAD = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p and not (p.startswith({root!r}) and ".venv" not in p)]
import importlib.util
assert importlib.util.find_spec("memory_models") is None, "memlab must not be importable yet"
import mlflow, numpy as np, torch
mlflow.set_tracking_uri({tracking!r})
tokens = np.array({tokens!r}, dtype=np.int64)
by_pyfunc = mlflow.pyfunc.load_model({uri!r}).predict(tokens)
by_torch = mlflow.pytorch.load_model({uri!r})(torch.as_tensor(tokens)).detach().numpy()
print(json.dumps({{"pyfunc": np.asarray(by_pyfunc).tolist(), "torch": by_torch.tolist(),
    "from": sys.modules["memory_models"].__file__}}))
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logged")
    tracking = f"sqlite:///{folder.resolve()}/mlflow.db"
    config = apply_overrides(
        debug("attention"), {"tracking.tracking_uri": tracking, "run.name": "logged"}
    )
    return publish(config, "memlab-logged-test", steps=1), tracking


def test_the_model_loads_without_memlab_at_any_length(published):
    result, tracking = published
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 37)).tolist()  # not 16, not 32
    probe = ISOLATED_LOAD.format(
        root=str(ROOT), tracking=tracking, uri=result.model_uri, tokens=tokens
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/memory_models/" in loaded["from"], loaded["from"]
    import mlflow

    from pipelines.checkpoint import load_model  # the same weights, rebuilt the memlab way

    checkpoint = Path(
        mlflow.artifacts.download_artifacts(
            run_id=result.run_id, artifact_path="checkpoint", tracking_uri=tracking
        )
    )
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        expected = model(torch.tensor(tokens))[0].numpy()
    np.testing.assert_allclose(np.asarray(loaded["pyfunc"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loaded["torch"]), expected, atol=1e-5)


def test_the_mlmodel_ships_code_requirements_and_a_variable_length_signature(published):
    import mlflow

    result, tracking = published
    mlflow.set_tracking_uri(tracking)
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert (local / "code" / "memory_models" / "model.py").is_file()
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"]["shape"] == [-1, -1]
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "pydantic" in requirements
    assert "memlab" not in requirements
    example = json.loads((local / "serving_input_example.json").read_text())
    assert len(example["inputs"][0]) == debug("attention").data.task.row_width
