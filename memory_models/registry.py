"""The one explicit map from a mechanism's `kind` tag to its config class.

Adding a mechanism means adding one line here; the contract tests then cover it.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from memory_models.attention import AttentionConfig
from memory_models.compressive import CompressiveConfig
from memory_models.dynamic_memory import DynamicMemoryConfig
from memory_models.gru import GRUConfig
from memory_models.layer import MemoryConfig
from memory_models.lstm import LSTMConfig
from memory_models.memory_network import MemoryNetworkConfig
from memory_models.reformer import ReformerConfig
from memory_models.transformer_xl import TransformerXLConfig

REGISTRY: dict[str, type[MemoryConfig]] = {
    "lstm": LSTMConfig,
    "gru": GRUConfig,
    "attention": AttentionConfig,
    "transformer_xl": TransformerXLConfig,
    "compressive": CompressiveConfig,
    "memory_network": MemoryNetworkConfig,
    "dynamic_memory": DynamicMemoryConfig,
    "reformer": ReformerConfig,
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
