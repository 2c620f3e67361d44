"""A self-supervised image encoder trained on the unlabeled pool, and linear probes of encoders.

    result = train_ssl_encoder(SSLEncoderConfig(steps=400), images, "/tmp/ssl-vit")
    # featurize then loads it like any DINO ViT: image_encoder: {path: /tmp/ssl-vit, image_size: 32}
    probe = linear_probe(embeddings, {"color": labels}, seed=0)   # {"color": 0.93}

The pipeline's I2I condition is the CLS token of a frozen ViT. The paper's is DINO ViT-B/16,
trained on ImageNet; on the synthetic data here a random ViT's CLS does not carry the object's
position (issue 18: grid cell at chance), so the prior could not learn layout from it. This
module trains the same architecture (a transformers `ViTModel`, saved with `save_pretrained`,
so `FrozenEncoders` loads it by path with no code of its own) on the images alone.

Objective (`SSLEncoderConfig.objective`):
- ``reconstruct`` (default): the CLS token of a corrupted view (pixel noise, random patch
  masking) must reconstruct the clean image at `recon_size` px through a linear decoder, a
  masked-autoencoder objective with the CLS token as its only bottleneck. Whatever the image
  holds at that scale (colours, positions, counts, coarse shapes) must pass through the one
  token the I2I condition uses, which is the property the condition needs.
- ``infonce``: SimCLR's InfoNCE between two views of each image (the batch's other images are
  the negatives), views differing by noise, masking and a shift of at most `max_shift` pixels.
  Measured on the scenes it carried colour and count but not position (linear probe below a
  random ViT's): nothing in it asks the embedding to tell one cell from another.
Neither uses colour jitter, flips or large crops: colour and position are attributes the
condition must keep. DINO's multi-crop self-distillation relies on exactly those augmentations,
so it is not used here (ours: a justified substitute, reported beside the random ViT).

The views are built from the same normalised pixels `FrozenEncoders.embed_images` feeds the ViT
(resize and centre-crop to the encoder's size, ImageNet normalisation), so the trained encoder
sees at featurize time what it was trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from lumos.configs.experiment import SSLEncoderConfig
from lumos.encoders.frozen import IMAGENET_MEAN, IMAGENET_STD, images_to_tensor
from lumos.errors import DatasetError


class SSLResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    steps: int
    images: int
    image_size: int
    first_loss: float | None
    final_loss: float | None
    seconds: float


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = images_to_tensor(images)  # (N, 3, H, W) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_view(x: torch.Tensor, cfg: SSLEncoderConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of normalised images (N, 3, H, W): shift, patch masking, pixel noise."""
    n, _, h, w = x.shape
    s, p = cfg.max_shift, cfg.patch_size
    if s:
        padded = F.pad(x, (s, s, s, s), mode="replicate")  # (N, 3, H + 2s, W + 2s)
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=generator)
        x = torch.stack(
            [padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offsets.tolist())]
        )  # (N, 3, H, W)
    if cfg.mask_fraction:
        keep = torch.rand(n, 1, h // p, w // p, generator=generator) >= cfg.mask_fraction
        keep = keep.float().repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (N,1,H,W)
        fill = x.mean(dim=(2, 3), keepdim=True)  # (N, 3, 1, 1): the image's mean colour
        x = x * keep + fill * (1 - keep)
    std = cfg.noise_std / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # noise in [0, 1] units
    return x + torch.randn(x.shape, generator=generator) * std


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its image, (2N - 2) negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2N, P)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])  # (2N,)
    return F.cross_entropy(sim, target)


def vit_config(cfg: SSLEncoderConfig, image_size: int):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        image_size=image_size,
        patch_size=cfg.patch_size,
    )


def train_ssl_encoder(
    cfg: SSLEncoderConfig, images: np.ndarray, out_dir: str | Path, device: str = "cpu"
) -> SSLResult:
    """Train a ViT on `images` (uint8 (N, H, W, 3), square, unlabeled) and save it to `out_dir`
    as a transformers ViTModel (config.json + model.safetensors)."""
    from transformers import ViTModel

    if images.ndim != 4 or images.shape[1] != images.shape[2] or len(images) < 2:
        raise DatasetError(f"SSL training needs >= 2 square images, got shape {images.shape}")
    size = int(images.shape[1])
    if size % cfg.patch_size:
        raise DatasetError(f"image side {size} is not a multiple of patch_size {cfg.patch_size}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = ViTModel(vit_config(cfg, size), add_pooling_layer=False)
    torch.nn.Module.to(model, device).train()
    d, r = cfg.hidden_size, min(cfg.recon_size, size)
    head: torch.nn.Module
    if cfg.objective == "reconstruct":
        head = torch.nn.Linear(d, 3 * r * r)
    else:
        head = torch.nn.Sequential(
            torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, cfg.projection_dim)
        )
    head.to(device)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    data = _normalise(images)  # (N, 3, S, S)
    targets = F.adaptive_avg_pool2d(data, r).flatten(1)  # (N, 3 r r): the clean image, small
    batch = min(cfg.batch_size, len(data))
    start, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data), (batch,), generator=generator)
        x = data[idx]  # (B, 3, S, S)
        if cfg.objective == "reconstruct":
            cls = model(pixel_values=make_view(x, cfg, generator).to(device)).last_hidden_state
            loss = F.mse_loss(head(cls[:, 0]), targets[idx].to(device))  # CLS -> (B, 3 r r)
        else:
            v1, v2 = make_view(x, cfg, generator), make_view(x, cfg, generator)
            cls = model(pixel_values=torch.cat([v1, v2]).to(device)).last_hidden_state[:, 0]
            z1, z2 = head(cls).chunk(2)  # (B, P) each
            loss = info_nce(z1, z2, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr_scale = min(1.0, (step + 1) / max(1, cfg.steps // 10))  # 10% linear warm-up
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_scale
        optimizer.step()
        losses.append(float(loss.detach()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    return SSLResult(
        path=str(out),
        steps=cfg.steps,
        images=len(data),
        image_size=size,
        first_loss=float(np.mean(losses[:10])) if losses else None,
        final_loss=float(np.mean(losses[-10:])) if losses else None,
        seconds=time.perf_counter() - start,
    )


def linear_probe(
    features: np.ndarray, labels: dict[str, list[str]], seed: int = 0, test_fraction: float = 0.25
) -> dict[str, float]:
    """Held-out accuracy of a multinomial logistic regression on frozen `features` (N, D), per
    label set (same N). One random split (`test_fraction` held out) for every label set."""
    n = len(features)
    if n < 8:
        raise DatasetError(f"a linear probe needs at least 8 items, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = max(2, round(test_fraction * n))
    test, train = order[:n_test], order[n_test:]
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std  # standardised on the training items
    out = {}
    for name, values in labels.items():
        if len(values) != n:
            raise DatasetError(f"probe labels {name!r}: {len(values)} labels for {n} items")
        classes = sorted(set(values))
        y = torch.tensor([classes.index(v) for v in values])
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], len(classes))
        opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=200)

        def closure(probe=probe, opt=opt, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(probe(x[train]), y[train]) + 1e-3 * probe.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[name] = float((probe(x[test]).argmax(-1) == y[test]).float().mean())
    return out
