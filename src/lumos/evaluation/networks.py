"""The frozen networks evaluation measures with: a DINO ViT's features and a CLIP model.

    space = FeatureSpace(encoders)              # the pipeline's DINO (or any ViTModel)
    space.cls(images)                           # (N, D): the Fréchet distance's features
    space.perceptual_distance(a, b)             # (N,): LPIPS-like, on the ViT's patch tokens
    clip = ClipScorer.load("s3://weights/clip-vit-l14", device="cuda")
    clip.score(images, captions)                # (N,): 100 * cos(image, caption)

Both load from a local directory or an object-store prefix (downloaded once), like the encoders:
no weights come from a hub at run time. Images are uint8 (H, W, 3) arrays of any size: each is
resized (shorter side) and center-cropped to the network's input size on its own, so a batch may
mix the aspect buckets of a dataset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lumos.encoders import FrozenEncoders
from lumos.encoders.frozen import IMAGENET_MEAN, IMAGENET_STD, images_to_tensor, resize_center_crop
from lumos.encoders.weights import resolve_weights_dir
from lumos.errors import NotFoundError

# OpenAI CLIP's input normalisation (used when the model directory has no preprocessor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The perceptual distance compares patch tokens after this many evenly spaced blocks (LPIPS
# compares five depths of its network; a ViT's blocks all have the same width).
PERCEPTUAL_DEPTHS = 4


def _pixels(
    images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float], device
) -> torch.Tensor:
    """uint8 images (H, W, 3), sizes may differ -> normalised (N, 3, size, size)."""
    crops = [
        resize_center_crop(images_to_tensor(np.array(im)[None]).to(device), size) for im in images
    ]  # each (1, 3, size, size)
    x = torch.cat(crops)  # (N, 3, size, size)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


class FeatureSpace:
    """A frozen DINO ViT (the pipeline's image encoder, or another one) as a feature space."""

    def __init__(self, encoders: FrozenEncoders, batch_size: int = 32):
        self.encoders = encoders
        self.batch_size = batch_size

    @torch.no_grad()
    def cls(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The CLS token after the final LayerNorm (the I2I condition's space): (N, D) float64."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self._input(images[i : i + self.batch_size])  # (B, 3, S, S)
            hidden = self.encoders.image_encoder(pixel_values=x).last_hidden_state  # (B, 1+P, D)
            out.append(hidden[:, 0].float().cpu().numpy())  # (B, D)
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def perceptual_distance(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
        """Per pair, LPIPS without its learned weights, on the ViT: at PERCEPTUAL_DEPTHS evenly
        spaced blocks, each patch token is scaled to unit length, and the squared distance of the
        two images' tokens is averaged over patches, then over depths. (N,), 0 for identical
        images, at most 4."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} images against {len(b)}")
        out = []
        for i in range(0, len(a), self.batch_size):
            fa = self._patch_tokens(a[i : i + self.batch_size])
            fb = self._patch_tokens(b[i : i + self.batch_size])
            per_depth = [((x - y) ** 2).sum(-1).mean(-1) for x, y in zip(fa, fb, strict=True)]
            out.append(torch.stack(per_depth).mean(0).cpu().numpy())  # (B,)
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def _patch_tokens(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        model = self.encoders.image_encoder
        hidden = model(pixel_values=self._input(images), output_hidden_states=True).hidden_states
        depth = len(hidden) - 1  # hidden[0] is the patch embedding
        picks = sorted(
            {max(1, round(depth * (k + 1) / PERCEPTUAL_DEPTHS)) for k in range(PERCEPTUAL_DEPTHS)}
        )
        tokens = [hidden[d][:, 1:].float() for d in picks]  # each (B, P, D), CLS left out
        return [t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8) for t in tokens]

    @torch.no_grad()
    def _input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        enc = self.encoders
        x = _pixels(images, enc.image_size, IMAGENET_MEAN, IMAGENET_STD, enc.device)
        return x.to(enc.dtype)


class ClipScorer:
    """A CLIP model (transformers `CLIPModel` + its tokenizer) scoring image-caption alignment."""

    def __init__(self, model, tokenizer, mean, std, device, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.device, self.batch_size = torch.device(device), batch_size

    @classmethod
    def load(
        cls,
        path: str,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        batch_size: int = 32,
    ) -> ClipScorer:
        """From a directory or s3:// prefix holding a CLIPModel (config.json + weights) and its
        tokenizer, as `save_pretrained` writes them (e.g. openai/clip-vit-large-patch14)."""
        from transformers import AutoTokenizer, CLIPModel

        what = "a CLIP model in transformers format (CLIPModel: config.json + weights, tokenizer)"
        local = resolve_weights_dir(path, what, cache_dir)
        if not (local / "config.json").exists():
            raise NotFoundError(f"no config.json in {str(local)!r}: put {what} there")
        model: torch.nn.Module = CLIPModel.from_pretrained(local)
        model = model.to(torch.device(device)).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(local)
        mean, std = _clip_normalisation(local)
        return cls(model, tokenizer, mean, std, device, batch_size)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-length image embeddings (N, E)."""
        size = self.model.config.vision_config.image_size
        out = []
        for i in range(0, len(images), self.batch_size):
            x = _pixels(images[i : i + self.batch_size], size, self.mean, self.std, self.device)
            e = _as_tensor(self.model.get_image_features(pixel_values=x))  # (B, E)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length text embeddings (N, E); captions longer than CLIP's context are cut."""
        limit = self.model.config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                max_length=limit, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            e = _as_tensor(self.model.get_text_features(**tokens))  # (B, E)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def score(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """Per pair, 100 x the cosine of the image and caption embeddings, (N,): CLIPScore
        without its clamp at 0 (real CLIP models do not reach it on captions; a mean over items
        of clamped values would hide how far below zero a mismatch is)."""
        return 100.0 * (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 returns a model output (pooled embeddings in `pooler_output`) where 4.x
    # returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clip_normalisation(local: Path) -> tuple[Sequence[float], Sequence[float]]:
    config = local / "preprocessor_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        return data.get("image_mean", CLIP_MEAN), data.get("image_std", CLIP_STD)
    return CLIP_MEAN, CLIP_STD
