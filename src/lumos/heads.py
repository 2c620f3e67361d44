"""The four heads: how each one changes the model config and turns a feature batch into inputs.

Heads differ by conditioning and data, not by a class hierarchy: a head is a small record
(`HeadSpec`) plus two functions, `head_model_config` and `batch_to_model_inputs`.

Batch keys (collated from cached features, see docs/architecture.md; `HeadSpec.batch_keys`):
- i2i: `latents (B,C,h,w)`, `image_embeds (B,D)`.
- t2i: `latents`, `text_embeds (B,L,Dt)`, `text_mask (B,L)`; optionally `image_size (B,2)`
  (height, width in pixels).
- multi-frame heads: `latents (B,F,C,h,w)`, `image_embeds (B,F,D)`, `frame_index (B,F)`,
  `camera (B,F,4)` = (azimuth_deg, elevation_deg, radius, 0) per view, absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lumos.errors import ModelConfigError


@dataclass(frozen=True)
class HeadSpec:
    """What a head is: its conditioning, its data shape and which parameters it adds."""

    name: str
    description: str
    multi_frame: bool
    # Parameter-name prefixes the head creates or re-initialises: weight transfer from the I2I
    # checkpoint may leave them new or drop their source weights; any other mismatch is an error.
    allowed_new: tuple[str, ...]
    # Required keys in the collated batch.
    batch_keys: tuple[str, ...]


HEADS: dict[str, HeadSpec] = {
    "i2i": HeadSpec(
        name="i2i",
        description="image-to-image pretraining: generate an image from its own DINO CLS",
        multi_frame=False,
        allowed_new=(),
        batch_keys=("latents", "image_embeds"),
    ),
    "t2i": HeadSpec(
        name="t2i",
        description="text-to-image: T5 tokens replace the DINO token; size/aspect embeddings",
        multi_frame=False,
        allowed_new=("cond_projector.", "csize_embedder.", "ar_embedder."),
        batch_keys=("latents", "text_embeds", "text_mask"),
    ),
    "novel_view": HeadSpec(
        name="novel_view",
        description="novel views jointly from view 0 plus the relative camera of each view",
        multi_frame=True,
        allowed_new=("temporal_blocks.", "frame_embedder."),
        batch_keys=("latents", "image_embeds", "camera"),
    ),
    "video": HeadSpec(
        name="video",
        description="frames from the first frame, frame-index embedding, frame and temporal "
        "attention",
        multi_frame=True,
        allowed_new=("temporal_blocks.", "frame_blocks.", "frame_embedder."),
        batch_keys=("latents", "image_embeds", "frame_index"),
    ),
}


def get_head(head: str) -> HeadSpec:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    return HEADS[head]


def head_model_config(
    base_config: dict,
    head: str,
    *,
    image_embed_dim: int | None = None,
    text_dim: int | None = None,
    text_tokens: int = 120,
    num_views: int | None = None,
    num_frames: int | None = None,
) -> dict:
    """The LumosDiT config of `head`, derived from the (I2I) base config and the data dimensions.

    i2i:        cond_dim = image_embed_dim (when given), one token.
    t2i:        cond_kind text, cond_dim = text_dim, cond_tokens = text_tokens, micro conditions.
    novel_view: num_frames = num_views, camera embedding, view-0 latent concatenated.
    video:      num_frames = num_frames, frame-index embedding, first-frame latent concatenated,
                frame attention (rotary positions, queries that know the frame).
    """
    spec = get_head(head)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    if image_embed_dim is not None and head != "t2i":
        config["cond_dim"] = image_embed_dim
    if head == "i2i":
        config.update(cond_kind="image", cond_tokens=1)
    elif head == "t2i":
        if text_dim is None:
            raise ModelConfigError(
                "head 't2i' needs text_dim (the text encoder's width, 4096 for T5-XXL)"
            )
        config.update(
            cond_kind="text", cond_dim=text_dim, cond_tokens=text_tokens, micro_conditions=True
        )
    else:
        frames = num_views if head == "novel_view" else num_frames
        what = "num_views" if head == "novel_view" else "num_frames"
        if frames is None or frames < 2:
            raise ModelConfigError(f"head {head!r} needs {what} >= 2, got {frames}")
        config.update(
            cond_kind="image",
            cond_tokens=1,
            num_frames=frames,
            frame_embed="camera" if head == "novel_view" else "index",
            concat_latent_channels=config.get("in_channels", 4),
        )
        if head == "video":
            # Moving an object needs attention that knows the frame (FrameAttention).
            config["frame_attention"] = True
    if spec.multi_frame != (config.get("num_frames", 1) > 1):
        raise ValueError(f"head {head}: frame mismatch")
    return config


def relative_camera(camera: torch.Tensor) -> torch.Tensor:
    """Absolute cameras (B, F, 4) = (azimuth_deg, elevation_deg, radius, _) -> relative to view 0.

    Zero123's parametrisation: (delta elevation [rad], sin and cos of delta azimuth, delta radius),
    so a full turn in azimuth maps to the same camera.
    """
    if camera.ndim != 3 or camera.shape[-1] < 3:
        raise ValueError(
            f"camera must be (B, F, 4) (azimuth_deg, elevation_deg, radius, _), got {tuple(camera.shape)}"
        )
    camera = camera.float()
    delta = camera - camera[:, :1]  # (B, F, 4)
    d_azimuth = delta[..., 0] * (math.pi / 180)  # (B, F)
    d_elevation = delta[..., 1] * (math.pi / 180)  # (B, F)
    d_radius = delta[..., 2]  # (B, F)
    return torch.stack(
        [d_elevation, torch.sin(d_azimuth), torch.cos(d_azimuth), d_radius], dim=-1
    )  # (B, F, 4)


def batch_to_model_inputs(
    head: str, batch: dict[str, torch.Tensor], latent_downsample: int = 8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x0, model_kwargs) for `GaussianDiffusion.training_losses` from a collated feature batch.

    `latent_downsample` converts the latent size to pixels for the T2I micro-condition when the
    batch has no `image_size` (8 for the SD VAE, 1 for pixel space).
    """
    spec = get_head(head)
    missing = [k for k in spec.batch_keys if k not in batch]
    if missing:
        raise KeyError(f"head {head!r} needs batch keys {missing}; got {sorted(batch)}")
    latents = batch["latents"]
    expected_ndim = 5 if spec.multi_frame else 4
    if latents.ndim != expected_ndim:
        raise ValueError(
            f"head {head!r} needs latents with {expected_ndim} dims, got {tuple(latents.shape)}"
        )
    x0 = latents.float()
    if head == "i2i":
        # Pretraining reconstructs the image from its own embedding: plain diffusion loss.
        return x0, {"cond": batch["image_embeds"].float()}
    if head == "t2i":
        if "image_size" in batch:
            micro = batch["image_size"].float()  # (B, 2)
        else:
            b, _, h, w = latents.shape
            size = torch.tensor([h * latent_downsample, w * latent_downsample], dtype=torch.float32)
            micro = size.to(latents.device).expand(b, 2)  # (B, 2)
        return x0, {
            "cond": batch["text_embeds"].float(),
            "cond_mask": batch["text_mask"].to(torch.bool),
            "micro_cond": micro,
        }
    image_embeds = batch["image_embeds"]
    if image_embeds.ndim != 3:
        raise ValueError(
            f"head {head!r} needs image_embeds (B, F, D), got {tuple(image_embeds.shape)}"
        )
    kwargs = {
        "cond": image_embeds[:, 0].float(),  # the input view / first frame's DINO CLS
        "concat_latent": x0[:, 0],  # (B, C, h, w)
    }
    if head == "novel_view":
        kwargs["frame_cond"] = relative_camera(batch["camera"])  # (B, F, 4)
    else:
        kwargs["frame_cond"] = batch["frame_index"].long()  # (B, F)
    return x0, kwargs
