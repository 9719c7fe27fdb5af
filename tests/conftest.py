"""Shared test set-up: small thread counts (2-CPU machines), one Ray cluster per session."""

from __future__ import annotations

import os

import pytest
import torch

# Tests run on 2 cores next to Ray workers; one intra-op thread keeps timings predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (start-up costs several seconds).

    4 logical CPUs on a 2-core machine: Train workers, Data tasks and a Tune driver all fit without
    anyone waiting forever for a CPU (`pipelines.runtime.start_private` explains the same choice).
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # the tests' own cluster, whatever else runs on this machine
            num_cpus=4,
            object_store_memory=256 * 1024**2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
