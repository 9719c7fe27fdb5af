"""Data preparation: synthetic memory tasks and byte-level text, prepared with Ray Data.

Pure generators live in `tasks/` and `text.py`; `build.py` is the one place that calls Ray.
"""

from typing import Any

from pipelines.data.config import DataConfig, parse_data_config
from pipelines.data.errors import DataError
from pipelines.data.tbptt import Segment, segments

__all__ = ["DataConfig", "DataError", "Segment", "parse_data_config", "segments", "task_batches"]


def __getattr__(name: str) -> Any:
    """`task_batches` on first use: it needs torch, which Ray's data tasks never load."""
    if name == "task_batches":
        from pipelines.data.batches import task_batches

        return task_batches
    raise AttributeError(f"module 'pipelines.data' has no attribute {name!r}")
