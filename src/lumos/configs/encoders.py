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
    kind: Literal["sd-vae", "pixel"] = Field(
        "sd-vae",
        description="sd-vae: diffusers AutoencoderKL weights (sd-vae-ft-mse); pixel: the latents "
        "are the image itself in [-1, 1] (tiny CPU runs need no pretrained VAE)",
    )
    path: str | None = Field(
        None,
        description="local dir or s3:// prefix holding config.json and diffusion_pytorch_model.*",
    )
    scaling_factor: float = Field(
        0.18215,
        description="SD's latent scale, which gives the diffusion model unit-variance latents",
    )
    # False: the posterior mean (deterministic cached latents); True: a posterior sample (DiT).
    sample_posterior: bool = Field(
        False,
        description="False: the posterior mean (deterministic cached latents); True: a posterior "
        "sample (DiT)",
    )

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        if self.kind == "pixel" and self.path is not None:
            raise ValueError("vae.kind='pixel' takes no path (latents are the pixels themselves)")
        return self


class TinyViTConfig(_Strict):
    """A ViT of DINO ViT-B/16's architecture at test size (random weights)."""

    hidden_size: int = Field(32, description="width of the tiny ViT")
    num_hidden_layers: int = Field(2, description="transformer layers of the tiny ViT")
    num_attention_heads: int = Field(2, description="attention heads of the tiny ViT")
    intermediate_size: int = Field(64, description="MLP width of the tiny ViT")
    image_size: int = Field(32, description="input side in pixels")
    patch_size: int = Field(8, description="patch side in pixels")
    # Random features tell images apart only at a larger init scale: at transformers' default
    # 0.02, every image's CLS token lies within cosine 0.99 of every other's (measured on the
    # embedded dataset: mean 0.995), so the I2I condition would carry almost nothing.
    initializer_range: float = Field(
        0.5, description="std of the random init; large so random CLS tokens tell images apart"
    )


class ImageEncoderConfig(_Strict):
    # A DINO ViT-B/16 in transformers format (ViTModel: config.json + model.safetensors),
    # e.g. facebook/dino-vitb16 downloaded elsewhere and copied to the object store.
    path: str | None = Field(
        None, description="a DINO ViT-B/16 in transformers format (local dir or s3:// prefix)"
    )
    tiny: TinyViTConfig | None = Field(
        None, description="instead of path: a random-init, frozen tiny ViT of the same architecture"
    )
    seed: int = Field(0, description="the tiny encoder's weights are a function of this seed")
    image_size: int = Field(
        224,
        description="resize the shorter side and centre-crop to this (ignored for tiny: its own "
        "size)",
    )

    @model_validator(mode="after")
    def _check(self) -> ImageEncoderConfig:
        if self.path is not None and self.tiny is not None:
            raise ValueError("image_encoder: give either path or tiny, not both")
        return self


class TinyT5Config(_Strict):
    """A T5 v1.1 encoder (gated-GELU) at test size, with the byte-level ByT5 tokenizer."""

    d_model: int = Field(32, description="width of the tiny T5 encoder")
    d_kv: int = Field(8, description="width of each attention head")
    d_ff: int = Field(64, description="MLP width")
    num_layers: int = Field(2, description="encoder layers")
    num_heads: int = Field(4, description="attention heads")


class TextEncoderConfig(_Strict):
    # T5 v1.1-XXL encoder + tokenizer in transformers format (T5EncoderModel, as PixArt uses it).
    path: str | None = Field(
        None,
        description="T5 v1.1-XXL encoder and tokenizer in transformers format (local dir or s3:// "
        "prefix)",
    )
    tiny: TinyT5Config | None = Field(
        None,
        description="instead of path: a random-init tiny T5 encoder with the byte-level ByT5 "
        "tokenizer",
    )
    seed: int = Field(0, description="the tiny encoder's weights are a function of this seed")
    max_tokens: int = Field(
        default=120, ge=1, description="caption tokens kept (PixArt-alpha: 120)"
    )

    @model_validator(mode="after")
    def _check(self) -> TextEncoderConfig:
        if self.path is not None and self.tiny is not None:
            raise ValueError("text_encoder: give either path or tiny, not both")
        return self


class EncodersConfig(_Strict):
    vae: VAEConfig = Field(VAEConfig(), description="the latent space: SD's VAE or pixel space")
    image_encoder: ImageEncoderConfig = Field(
        ImageEncoderConfig(),
        description="the image encoder whose CLS embedding conditions I2I (DINO)",
    )
    text_encoder: TextEncoderConfig = Field(
        TextEncoderConfig(), description="the text encoder whose tokens condition T2I (T5)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the encoders' compute dtype"
    )
    # Where s3:// weights are downloaded; None: $LUMOS_CACHE_DIR or ~/.cache/lumos/encoders.
    cache_dir: str | None = Field(
        None,
        description="where s3:// weights are downloaded; None: $LUMOS_CACHE_DIR or "
        "~/.cache/lumos/encoders",
    )

    @classmethod
    def tiny(cls, seed: int = 0, max_tokens: int = 120) -> EncodersConfig:
        """The CPU preset: pixel latents, tiny random ViT and T5, deterministic from `seed`."""
        return cls(
            vae=VAEConfig(kind="pixel"),
            image_encoder=ImageEncoderConfig(tiny=TinyViTConfig(), seed=seed),
            text_encoder=TextEncoderConfig(tiny=TinyT5Config(), seed=seed, max_tokens=max_tokens),
        )
