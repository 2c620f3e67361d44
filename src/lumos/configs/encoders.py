"""EncodersConfig: which frozen VAE, image encoder (DINO) and text encoder (T5) to use.

Defaults are the paper's recipe (SD KL-f8 VAE, DINO ViT-B/16 CLS at 224 px, T5 v1.1-XXL with 120
tokens); their weights cannot be downloaded at run time, so each `path` must point to a local
directory or an `s3://` prefix holding them. `EncodersConfig.tiny()` is the CPU preset: pixel-space
latents and randomly initialised, seeded, frozen tiny encoders of the same architectures.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VAEConfig(_Strict):
    # "sd-vae": diffusers AutoencoderKL weights (sd-vae-ft-mse); "pixel": latents are the image
    # itself in [-1, 1] (3 channels, no downsampling), so tiny CPU runs need no pretrained VAE.
    kind: Literal["sd-vae", "pixel"] = "sd-vae"
    path: str | None = None  # local dir or s3:// prefix: config.json + diffusion_pytorch_model.*
    scaling_factor: float = 0.18215  # SD's latent scale: unit variance for the diffusion model
    # False: the posterior mean (deterministic cached latents); True: a posterior sample (DiT).
    sample_posterior: bool = False

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        if self.kind == "pixel" and self.path is not None:
            raise ValueError("vae.kind='pixel' takes no path (latents are the pixels themselves)")
        return self


class TinyViTConfig(_Strict):
    """A ViT of DINO ViT-B/16's architecture at test size (random weights)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 64
    image_size: int = 32
    patch_size: int = 8
    # Random features tell images apart only at a larger init scale: at transformers' default
    # 0.02, every image's CLS token lies within cosine 0.99 of every other's (measured on the
    # embedded dataset: mean 0.995), so the I2I condition would carry almost nothing.
    initializer_range: float = 0.5


class ImageEncoderConfig(_Strict):
    # A DINO ViT-B/16 in transformers format (ViTModel: config.json + model.safetensors),
    # e.g. facebook/dino-vitb16 downloaded elsewhere and copied to the object store.
    path: str | None = None
    tiny: TinyViTConfig | None = None  # instead of path: random-init frozen tiny ViT
    seed: int = 0  # the tiny encoder's weights are a function of this seed
    image_size: int = 224  # resize shorter side + center crop (ignored for tiny: its image size)

    @model_validator(mode="after")
    def _check(self) -> ImageEncoderConfig:
        if self.path is not None and self.tiny is not None:
            raise ValueError("image_encoder: give either path or tiny, not both")
        return self


class TinyT5Config(_Strict):
    """A T5 v1.1 encoder (gated-GELU) at test size, with the byte-level ByT5 tokenizer."""

    d_model: int = 32
    d_kv: int = 8
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4


class TextEncoderConfig(_Strict):
    # T5 v1.1-XXL encoder + tokenizer in transformers format (T5EncoderModel, as PixArt uses it).
    path: str | None = None
    tiny: TinyT5Config | None = None
    seed: int = 0
    max_tokens: int = Field(default=120, ge=1)  # PixArt-alpha: 120 tokens

    @model_validator(mode="after")
    def _check(self) -> TextEncoderConfig:
        if self.path is not None and self.tiny is not None:
            raise ValueError("text_encoder: give either path or tiny, not both")
        return self


class EncodersConfig(_Strict):
    vae: VAEConfig = VAEConfig()
    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Where s3:// weights are downloaded; None: $LUMOS_CACHE_DIR or ~/.cache/lumos/encoders.
    cache_dir: str | None = None

    @classmethod
    def tiny(cls, seed: int = 0, max_tokens: int = 120) -> EncodersConfig:
        """The CPU preset: pixel latents, tiny random ViT and T5, deterministic from `seed`."""
        return cls(
            vae=VAEConfig(kind="pixel"),
            image_encoder=ImageEncoderConfig(tiny=TinyViTConfig(), seed=seed),
            text_encoder=TextEncoderConfig(tiny=TinyT5Config(), seed=seed, max_tokens=max_tokens),
        )
