"""The one map from `model.architecture` to the model config class, like `registry` for kinds.

`decoder_only` is `SequenceModel` (the default: a config without the tag, written before it
existed, reads as decoder-only); `encoder_decoder` is `EncoderDecoderModel`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag, TypeAdapter

from memory_models.encoder_decoder import EncoderDecoderConfig, EncoderDecoderModel
from memory_models.model import SequenceModel, SequenceModelConfig

ARCHITECTURES = {
    "decoder_only": SequenceModelConfig,
    "encoder_decoder": EncoderDecoderConfig,
}
DEFAULT_ARCHITECTURE = "decoder_only"

TokenModel = SequenceModel | EncoderDecoderModel


def _architecture(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("architecture", DEFAULT_ARCHITECTURE)
    return getattr(value, "architecture", DEFAULT_ARCHITECTURE)


# pydantic picks the class from the tag and names the tag in its errors.
AnyModelConfig = Annotated[
    Annotated[SequenceModelConfig, Tag("decoder_only")]
    | Annotated[EncoderDecoderConfig, Tag("encoder_decoder")],
    Discriminator(
        _architecture,
        custom_error_type="unknown_architecture",
        custom_error_message="architecture must be one of: " + ", ".join(ARCHITECTURES),
    ),
]

_ADAPTER: TypeAdapter[SequenceModelConfig | EncoderDecoderConfig] = TypeAdapter(AnyModelConfig)


def model_config(data: dict) -> SequenceModelConfig | EncoderDecoderConfig:
    """Validate a plain dict (from JSON, a CLI or a Ray boundary) into its architecture's config."""
    return _ADAPTER.validate_python(data)
