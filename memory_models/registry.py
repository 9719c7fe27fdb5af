"""The one explicit map from a mechanism's `kind` tag to its config class.

Adding a mechanism means adding one line here; the contract tests then cover it.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from memory_models.attention import AttentionConfig
from memory_models.compressive import CompressiveConfig
from memory_models.deltanet import DeltaNetConfig
from memory_models.dynamic_memory import DynamicMemoryConfig
from memory_models.gla import GLAConfig
from memory_models.gru import GRUConfig
from memory_models.hierarchical import HierarchicalConfig
from memory_models.layer import MemoryConfig
from memory_models.linear_attention import LinearAttentionConfig
from memory_models.lstm import LSTMConfig
from memory_models.mamba import MambaConfig
from memory_models.memory_network import MemoryNetworkConfig
from memory_models.reformer import ReformerConfig
from memory_models.retnet import RetNetConfig
from memory_models.retrieval import RetrievalConfig
from memory_models.sparse import SparseConfig
from memory_models.transformer_xl import TransformerXLConfig

REGISTRY: dict[str, type[MemoryConfig]] = {
    # Gated recurrences: a vector of state.
    "lstm": LSTMConfig,
    "gru": GRUConfig,
    # Fixed-state families: a matrix of state per head, a linear recurrence with a decay or gate.
    "linear_attention": LinearAttentionConfig,
    "retnet": RetNetConfig,
    "gla": GLAConfig,
    "deltanet": DeltaNetConfig,
    "mamba": MambaConfig,
    # Attention over a cache of past keys and values, full or bounded.
    "attention": AttentionConfig,
    "sparse": SparseConfig,
    "reformer": ReformerConfig,
    "hierarchical": HierarchicalConfig,
    "transformer_xl": TransformerXLConfig,
    "compressive": CompressiveConfig,
    # External memories written and read by learned addressing or retrieval.
    "memory_network": MemoryNetworkConfig,
    "dynamic_memory": DynamicMemoryConfig,
    "retrieval": RetrievalConfig,
}

# pydantic picks the config class from the `kind` tag and names the tag in its errors.
AnyMemoryConfig = Annotated[
    Union[tuple(REGISTRY.values())],  # noqa: UP007 - a runtime tuple needs Union[...]
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[MemoryConfig] = TypeAdapter(AnyMemoryConfig)


def memory_config(data: dict) -> MemoryConfig:
    """Validate a plain dict (from JSON, a CLI or a Ray boundary) into its mechanism's config."""
    return _ADAPTER.validate_python(data)


def kinds() -> list[str]:
    return list(REGISTRY)
