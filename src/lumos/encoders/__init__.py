"""The frozen encoders (VAE or pixel space, DINO CLS, T5 tokens) and their config."""

from lumos.encoders.config import (
    EncodersConfig,
    ImageEncoderConfig,
    TextEncoderConfig,
    TinyT5Config,
    TinyViTConfig,
    VAEConfig,
)
from lumos.encoders.frozen import FrozenEncoders

__all__ = [
    "EncodersConfig",
    "FrozenEncoders",
    "ImageEncoderConfig",
    "TextEncoderConfig",
    "TinyT5Config",
    "TinyViTConfig",
    "VAEConfig",
]
