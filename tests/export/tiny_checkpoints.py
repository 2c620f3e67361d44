"""Tiny real checkpoints for the export and serving tests (CPU, seconds).

The weights are the model's own initialisation plus small noise: LumosDiT starts with zero output
layers (adaLN-Zero), so an untrained model predicts zeros and would make every comparison trivial.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lumos.checkpoints import save_checkpoint
from lumos.configs.encoders import EncodersConfig, VAEConfig
from lumos.heads import head_model_config
from lumos.models.lumos_dit import LumosDiT, lumos_dit_config

TEXT_TOKENS = 8


def tiny_vae_dir(root: Path) -> Path:
    """A 2-level AutoencoderKL (2x downsampling, 4 latent channels), random weights, saved."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    path = root / "tiny-vae"
    vae.save_pretrained(path)
    return path


def _perturbed(config: dict, seed: int) -> LumosDiT:
    torch.manual_seed(seed)
    model = LumosDiT(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_checkpoint(
    root: Path, head: str, *, vae: bool, **model_overrides
) -> tuple[str, EncodersConfig]:
    """Save a tiny checkpoint of `head` under root; returns its URI and its encoders config.

    vae=True: a tiny SD-style VAE (16 px images -> 4 x 8 x 8 latents); False: pixel space (8 px).
    """
    encoders = EncodersConfig.tiny(max_tokens=TEXT_TOKENS)
    if vae:
        encoders = encoders.model_copy(
            update={"vae": VAEConfig(kind="sd-vae", path=str(tiny_vae_dir(root)))}
        )
    base = lumos_dit_config(
        "tiny",
        depth=1,  # one block exercises every path; each block adds seconds to the export
        input_size=8,
        in_channels=4 if vae else 3,
        cond_dim=encoders.image_encoder.tiny.hidden_size,
    )
    config = head_model_config(
        base,
        head,
        text_dim=encoders.text_encoder.tiny.d_model,
        text_tokens=TEXT_TOKENS,
        num_views=3,
        num_frames=3,
    )
    model = _perturbed({**config, **model_overrides}, seed=1)
    uri = str(root / f"ckpt-{head}")
    meta = {
        "head": head,
        "step": 10,
        "encoders": encoders.model_dump(mode="json"),
        "data": {"dataset_uri": "file:///data/tiny", "manifest_sha256": "0" * 64},
        "parent": None,
        "train_config": {},
        "transfer_report": None,
    }
    save_checkpoint(uri, model, model, meta)
    return uri, encoders
