"""The frozen encoders (VAE or pixel space, DINO CLS, T5 tokens); their config is
`lumos.configs.encoders`."""

from lumos.encoders.frozen import FrozenEncoders

__all__ = ["FrozenEncoders"]
