"""The frozen encoders: VAE (or pixel space), DINO ViT CLS embeddings, T5 token embeddings.

Each part loads on first use, so an image-only featurize never needs the text encoder's weights.
All inputs are uint8 images NHWC (numpy or torch); outputs are float32 torch tensors on `device`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lumos.configs.encoders import EncodersConfig
from lumos.encoders.sizes import tiny_t5_config
from lumos.encoders.weights import resolve_weights_dir
from lumos.errors import NotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    return images.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased), then center-crop size x size."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)  # (N, 3, size, size)


class FrozenEncoders:
    """The frozen encoders of one `EncodersConfig`, in eval mode without gradients."""

    def __init__(self, cfg: EncodersConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]

    @classmethod
    def from_config(cls, cfg: EncodersConfig, device: str | torch.device = "cpu") -> FrozenEncoders:
        return cls(cfg, device)

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _dir(self, path: str, what: str) -> Path:
        return resolve_weights_dir(path, what, self.cfg.cache_dir)

    # ---- VAE ---------------------------------------------------------------------------------
    @cached_property
    def vae(self):
        cfg = self.cfg.vae
        if cfg.kind == "pixel":
            return None
        from diffusers import AutoencoderKL

        what = (
            "Stable Diffusion's KL VAE (sd-vae-ft-mse) in diffusers format (config.json + weights)"
        )
        if cfg.path is None:
            raise NotFoundError(
                f"encoders.vae.path is not set: point it to a directory or s3:// prefix with {what}, "
                "or use vae.kind='pixel'"
            )
        local = self._dir(cfg.path, what)
        subfolder = "vae" if (local / "vae" / "config.json").exists() else None
        if not (local / (subfolder or "") / "config.json").exists():
            raise NotFoundError(f"no config.json in {str(local)!r}: put {what} there")
        return self._freeze(AutoencoderKL.from_pretrained(local, subfolder=subfolder))

    @property
    def latent_channels(self) -> int:
        return 3 if self.vae is None else self.vae.config.latent_channels

    @property
    def latent_downsample(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_range(self) -> float | None:
        """Bound of the latents' values, when there is one: pixel-space latents lie in [-1, 1],
        so samplers may threshold their x0 predictions to it (DPM-Solver++'s advice for pixel
        space); VAE latents have no fixed bound."""
        return 1.0 if self.vae is None else None

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> scaled latents float32 (N, C, H / f, W / f)."""
        x = images_to_tensor(images).to(self.device) * 2 - 1  # (N, 3, H, W) in [-1, 1]
        if self.vae is None:
            return x
        f = self.latent_downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE's {f}")
        dist = self.vae.encode(x.to(self.dtype)).latent_dist
        latents = dist.sample() if self.cfg.vae.sample_posterior else dist.mode()  # (N, C, h, w)
        return latents.float() * self.cfg.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (N, C, h, w) -> uint8 (N, H, W, 3) numpy."""
        latents = latents.to(self.device).float()
        if self.vae is None:
            x = latents  # (N, 3, H, W) already in [-1, 1]
        else:
            z = (latents / self.cfg.vae.scaling_factor).to(self.dtype)
            x = self.vae.decode(z).sample.float()  # (N, 3, H, W)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, H, W)
        return x.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)

    # ---- image encoder (DINO CLS) ------------------------------------------------------------
    @cached_property
    def image_encoder(self):
        from transformers import ViTConfig, ViTModel

        cfg = self.cfg.image_encoder
        if cfg.tiny is not None:
            config = ViTConfig(**cfg.tiny.model_dump())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the tiny encoder is a function of its seed
                model = ViTModel(config, add_pooling_layer=False)
            return self._freeze(model)
        what = "a DINO ViT-B/16 in transformers format (ViTModel: config.json + model.safetensors)"
        if cfg.path is None:
            raise NotFoundError(
                f"encoders.image_encoder.path is not set: point it to a directory or s3:// prefix "
                f"with {what}, or set image_encoder.tiny for a test encoder"
            )
        local = self._dir(cfg.path, what)
        if not (local / "config.json").exists():
            raise NotFoundError(f"no config.json in {str(local)!r}: put {what} there")
        return self._freeze(ViTModel.from_pretrained(local, add_pooling_layer=False))

    @property
    def image_size(self) -> int:
        cfg = self.cfg.image_encoder
        return cfg.tiny.image_size if cfg.tiny is not None else cfg.image_size

    @property
    def image_embed_dim(self) -> int:
        return self.image_encoder.config.hidden_size

    @torch.no_grad()
    def embed_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> raw CLS after the final LayerNorm, float32 (N, D)."""
        x = resize_center_crop(images_to_tensor(images).to(self.device), self.image_size)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.dtype)  # (N, 3, S, S)
        hidden = self.image_encoder(pixel_values=x).last_hidden_state  # (N, 1 + P, D), normed
        return hidden[:, 0].float()  # (N, D)

    # ---- text encoder (T5) -------------------------------------------------------------------
    @cached_property
    def _text(self):
        from transformers import AutoTokenizer, ByT5Tokenizer, T5EncoderModel

        cfg = self.cfg.text_encoder
        if cfg.tiny is not None:
            tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file
            config = tiny_t5_config(cfg.tiny)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = T5EncoderModel(config)
            return tokenizer, self._freeze(model)
        what = "a T5 v1.1-XXL encoder and its tokenizer in transformers format"
        if cfg.path is None:
            raise NotFoundError(
                f"encoders.text_encoder.path is not set: point it to a directory or s3:// prefix "
                f"with {what}, or set text_encoder.tiny for a test encoder"
            )
        local = self._dir(cfg.path, what)
        model_dir = local / "text_encoder" if (local / "text_encoder").is_dir() else local
        tok_dir = local / "tokenizer" if (local / "tokenizer").is_dir() else local
        if not (model_dir / "config.json").exists():
            raise NotFoundError(f"no config.json in {str(model_dir)!r}: put {what} there")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        # T5 pads on the right; cached features store only the tokens before the padding.
        tokenizer.padding_side = "right"
        return tokenizer, self._freeze(T5EncoderModel.from_pretrained(model_dir))

    @property
    def text_dim(self) -> int:
        return self._text[1].config.d_model

    @property
    def max_tokens(self) -> int:
        return self.cfg.text_encoder.max_tokens

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (token embeddings float32 (N, L, D), padding mask bool (N, L)), L = max_tokens."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        tokenizer, model = self._text
        tokens = tokenizer(
            list(texts),
            max_length=self.max_tokens,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (N, L)
        mask = tokens["attention_mask"].to(self.device)  # (N, L)
        emb = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, D)
        return emb.float(), mask.bool()

    def describe(self) -> dict:
        """What the features were made with (written next to cached features)."""
        return {"config": self.cfg.model_dump(mode="json")}
