"""Sampling: DPM-Solver++ (multistep, order 2) with classifier-free guidance; I2I interpolation.

Guidance batches the conditional and the unconditional halves into one forward: the second half
has `force_drop=True`, which replaces the raw condition by the model's saved null embedding and
zeroes a multi-frame head's concatenated input view / first frame (as condition dropout did in
training), so guidance acts on the view too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from lumos.diffusion.gaussian import GaussianDiffusion


def make_scheduler(
    diffusion: GaussianDiffusion | None = None,
    clip_x0: float | None = None,
    prediction_type: str = "epsilon",
) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (order 2) on the same linear-beta schedule the model was trained with.

    clip_x0: for latents with a known bound (pixel space: 1.0), dynamic thresholding of the
    solver's x0 predictions to it, as DPM-Solver++ recommends for pixel-space models; with a
    linear schedule, an imperfect epsilon at high noise otherwise yields x0 far out of range.
    prediction_type: what the model outputs, its config's ("epsilon" or "v_prediction")."""
    diffusion = diffusion or GaussianDiffusion()
    thresholding = (
        {"thresholding": True, "sample_max_value": clip_x0, "dynamic_thresholding_ratio": 0.995}
        if clip_x0 is not None
        else {}
    )
    return DPMSolverMultistepScheduler(
        **thresholding,
        num_train_timesteps=diffusion.num_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=prediction_type,
        lower_order_final=True,
    )


def _batch_size(kwargs: dict) -> int | None:
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    return None


def _cfg_kwargs(model_kwargs: dict, null_kwargs: dict | None, batch: int, device) -> dict:
    """[conditional; unconditional] kwargs: every tensor doubled, force_drop on the second half."""
    uncond = {**model_kwargs, **(null_kwargs or {})}
    doubled: dict[str, torch.Tensor | None] = {}
    for key, value in model_kwargs.items():
        if key == "force_drop":
            continue
        other = uncond[key]
        if isinstance(value, torch.Tensor):
            doubled[key] = torch.cat([value, other.to(value.device, value.dtype)], dim=0)
        else:
            if value is not None or other is not None:
                raise ValueError(f"kwarg {key!r} must be a tensor or None")
            doubled[key] = None
    doubled["force_drop"] = torch.cat(
        [
            torch.zeros(batch, dtype=torch.bool, device=device),
            torch.ones(batch, dtype=torch.bool, device=device),
        ]
    )
    return doubled


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    shape: Sequence[int],
    model_kwargs: dict,
    *,
    steps: int = 20,
    guidance_scale: float = 4.5,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    null_kwargs: dict | None = None,
    diffusion: GaussianDiffusion | None = None,
    device: torch.device | str | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Latents of `shape` (B, C, H, W) or (B, F, C, H, W) sampled from noise with CFG.

    guidance_scale 1.0 disables guidance (one forward per step). `null_kwargs` overrides entries
    of the unconditional half (e.g. a text mask); the condition itself is dropped by force_drop.
    The first C output channels (epsilon, or v for a model whose config says so) drive the solver;
    the learned variance is not needed.
    clip_x0 bounds the solver's x0 predictions (pass `FrozenEncoders.latent_range`).
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch = shape[0]
    kw_batch = _batch_size(model_kwargs)
    if kw_batch not in (None, batch):
        raise ValueError(f"model_kwargs have batch {kw_batch}, shape has {batch}")
    if noise is None:
        noise = torch.randn(
            shape, generator=generator, device=generator.device if generator else "cpu"
        )
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise {tuple(noise.shape)} != shape {shape}")
    x = noise.to(device=device, dtype=torch.float32)
    model_kwargs = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_kwargs.items()
    }
    use_cfg = guidance_scale != 1.0
    kwargs = _cfg_kwargs(model_kwargs, null_kwargs, batch, device) if use_cfg else model_kwargs
    channels = shape[-3]

    config = getattr(model, "config", None)
    scheduler = make_scheduler(
        diffusion, clip_x0, getattr(config, "prediction_type", None) or "epsilon"
    )
    scheduler.set_timesteps(steps, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x], dim=0) if use_cfg else x  # ([2]B, [F,] C, H, W)
            t_in = t.expand(x_in.shape[0]).to(device)  # ([2]B,)
            out = model(x_in, t_in, **kwargs).float()  # ([2]B, [F,] 2C, H, W)
            eps = out.narrow(-3, 0, channels)  # ([2]B, [F,] C, H, W)
            if use_cfg:
                eps_cond, eps_uncond = eps.chunk(2, dim=0)  # (B, [F,] C, H, W) each
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, return_dict=False)[0]  # (B, [F,] C, H, W)
    finally:
        model.train(was_training)
    return x


@torch.no_grad()
def interpolate(
    model: torch.nn.Module,
    embed_a: torch.Tensor,
    embed_b: torch.Tensor,
    latent_shape: Sequence[int],
    *,
    num: int = 5,
    alphas: Sequence[float] | None = None,
    steps: int = 20,
    guidance_scale: float = 4.5,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    diffusion: GaussianDiffusion | None = None,
) -> torch.Tensor:
    """I2I interpolation: latents (K, C, H, W) for blends of two images' normalised CLS embeddings.

    The initial noise is the same for every blend, so the change along the row comes from the
    condition alone. embed_a, embed_b: (D,) raw DINO CLS; latent_shape: (C, H, W).
    """
    if embed_a.ndim != 1 or embed_a.shape != embed_b.shape:
        raise ValueError(
            f"embeddings must be two (D,) vectors, got {tuple(embed_a.shape)} and {tuple(embed_b.shape)}"
        )
    alphas = list(alphas) if alphas is not None else torch.linspace(0, 1, num).tolist()
    a = F.normalize(embed_a.float(), dim=0)  # (D,)
    b = F.normalize(embed_b.float(), dim=0)  # (D,)
    weights = torch.tensor(alphas, dtype=torch.float32).unsqueeze(1)  # (K, 1)
    cond = (1 - weights) * a + weights * b  # (K, D); the model re-normalises
    latent_shape = tuple(latent_shape)
    if noise is None:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.randn((1, *latent_shape), generator=generator, device=gen_device)
    noise = noise.reshape(1, *latent_shape).expand(len(alphas), *latent_shape).contiguous()
    return sample(
        model,
        (len(alphas), *latent_shape),
        {"cond": cond},
        steps=steps,
        guidance_scale=guidance_scale,
        noise=noise,
        diffusion=diffusion,
    )
