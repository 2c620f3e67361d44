"""Gaussian diffusion (hybrid loss) and DPM-Solver++ sampling with guidance, on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lumos.diffusion import GaussianDiffusion, interpolate, make_scheduler, sample
from lumos.models import LumosDiT, lumos_dit_config


class FixedOutput(nn.Module):
    """A 'model' whose output is a learnable tensor: lets the loss be checked against truth."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = nn.Parameter(output.clone())

    def forward(self, x, t, **kwargs):
        return self.output


def tiny_model(seed: int = 0, **overrides) -> LumosDiT:
    torch.manual_seed(seed)
    model = LumosDiT(**lumos_dit_config("tiny", input_size=8, cond_dim=16, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_linear_schedule_and_q_sample():
    d = GaussianDiffusion()
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, noise)
    a = d.alphas_cumprod[t].float().view(3, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 2, 4, 8, 8)])
def test_perfect_epsilon_has_zero_mse_and_vb_trains_only_the_variance(shape):
    d = GaussianDiffusion()
    x0 = torch.rand(shape) * 2 - 1
    noise = torch.randn(shape)
    t = torch.tensor([0, 10, 999])
    model = FixedOutput(torch.cat([noise, torch.zeros(shape)], dim=-3))
    losses = d.training_losses(model, x0, t, {}, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (3,)
    torch.testing.assert_close(losses["mse"], torch.zeros(3))
    assert (losses["vb"] > 0).all() and torch.isfinite(losses["vb"]).all()
    losses["vb"].sum().backward()
    eps_grad, var_grad = model.output.grad.split(4, dim=-3)
    assert torch.count_nonzero(eps_grad) == 0, "vb must not train the mean (stop-gradient)"
    assert torch.count_nonzero(var_grad) > 0


def test_v_prediction_target_and_its_epsilon():
    """v = sqrt(a) eps - sqrt(1 - a) x0 (diffusers' DDPMScheduler.get_velocity): the true v has
    zero mse, and the vb term sees the same epsilon as an epsilon model's (same variance loss)."""
    from diffusers import DDPMScheduler

    d = GaussianDiffusion()
    x0 = torch.rand(3, 4, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    reference = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    v = reference.get_velocity(x0, noise, t)
    torch.testing.assert_close(d.v_target(x0, noise, t), v)
    var = torch.rand_like(x0) * 2 - 1
    as_v = d.training_losses(
        FixedOutput(torch.cat([v, var], dim=1)), x0, t, {}, noise=noise,
        prediction_type="v_prediction",
    )  # fmt: skip
    as_eps = d.training_losses(FixedOutput(torch.cat([noise, var], dim=1)), x0, t, {}, noise=noise)
    torch.testing.assert_close(as_v["mse"], torch.zeros(3))
    torch.testing.assert_close(as_v["vb"], as_eps["vb"], atol=1e-4, rtol=1e-4)


def test_v_mse_weighs_the_x0_error_by_snr_plus_one_and_clamps_like_epsilon():
    d = GaussianDiffusion()
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400, 750, 999])
    x0_guess = torch.zeros_like(x0)  # every model below predicts x0 = 0: x0 error = ||x0||^2
    x_t = d.q_sample(x0, t, noise)
    v_guess = d.v_target(
        x0_guess, (x_t - 0) / d.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1), t
    )
    snr = d.snr[t].float()
    x0_err = (x0**2).mean(dim=(1, 2, 3))
    model = FixedOutput(torch.cat([v_guess, torch.zeros_like(x0)], dim=1))
    plain = d.training_losses(model, x0, t, {}, noise=noise, prediction_type="v_prediction")
    torch.testing.assert_close(plain["mse"], x0_err * (snr + 1), rtol=1e-3, atol=1e-5)
    clamped = d.training_losses(
        model, x0, t, {}, noise=noise, prediction_type="v_prediction", snr_gamma=5.0,
        snr_floor=1.0,
    )  # fmt: skip
    torch.testing.assert_close(clamped["mse"], x0_err * snr.clamp(1.0, 5.0), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        d.training_losses(model, x0, t, {}, noise=noise, prediction_type="sample")


class Oracle(nn.Module):
    """The exact denoiser of a one-image dataset, in either parametrisation: a correct sampler
    must end at that image (the model's config says what its output is, as LumosDiT's does)."""

    def __init__(self, image: torch.Tensor, prediction_type: str):
        super().__init__()
        self.image = image
        self.config = SimpleNamespace(prediction_type=prediction_type)
        self.anchor = nn.Parameter(torch.zeros(()))  # sample() reads the device from a parameter
        self.d = GaussianDiffusion()

    def forward(self, x, t, **kwargs):
        a = self.d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.image) / (1 - a).sqrt()
        out = (
            eps if self.config.prediction_type == "epsilon" else self.d.v_target(self.image, eps, t)
        )
        return torch.cat([out, torch.zeros_like(out)], dim=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_follows_the_models_prediction_type(prediction_type):
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    out = sample(
        Oracle(image, prediction_type), (2, 3, 8, 8), {}, steps=10, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)
    # Read as the other parametrisation, the same outputs land elsewhere: the type matters.
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    wrong = Oracle(image, prediction_type)
    wrong.config = SimpleNamespace(prediction_type=other)
    wrong.forward = Oracle(image, prediction_type).forward  # outputs stay in the true type
    off = sample(wrong, (2, 3, 8, 8), {}, steps=10, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (off - image).abs().max() > 0.1


def test_vb_term_is_the_kl_for_t_above_zero():
    d = GaussianDiffusion()
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([300, 300])
    # v = -1: the model's variance is the posterior variance; with the true eps the KL is 0.
    model = FixedOutput(torch.cat([noise, -torch.ones_like(x0)], dim=1))
    losses = d.training_losses(model, x0, t, {}, noise=noise)
    torch.testing.assert_close(losses["vb"], torch.zeros(2), atol=1e-5, rtol=0)


def test_min_snr_gamma_scales_the_epsilon_term_by_min_snr_gamma_over_snr():
    """Hang et al. 2023 (diffusers' --snr_gamma for epsilon prediction): weight min(SNR, g) / SNR
    with SNR = alpha_bar / (1 - alpha_bar); the vb term is left as it is."""
    d = GaussianDiffusion()
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 150, 400, 999])
    model = FixedOutput(torch.cat([torch.zeros_like(x0), torch.zeros_like(x0)], dim=1))
    plain = d.training_losses(model, x0, t, {}, noise=noise)
    weighted = d.training_losses(model, x0, t, {}, noise=noise, snr_gamma=5.0)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr).float()
    assert weight[0] < 1e-3 and weight[-1] == 1.0  # nearly clean steps lose weight, noisy keep it
    torch.testing.assert_close(weighted["mse"], plain["mse"] * weight)
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], weighted["mse"] + weighted["vb"])


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_snr_floor_weighs_every_steps_x0_error_at_least_the_floor(gamma):
    """Truncated SNR (Salimans & Ho 2022, Imagen Video): the x0 error behind an epsilon error is
    scaled by 1 / SNR, so the x0 weight is max(SNR, floor) (clamped to gamma too, with Min-SNR);
    the epsilon weight is that over SNR, >= 1 at the noisy steps."""
    d = GaussianDiffusion()
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400, 750, 999])
    model = FixedOutput(torch.zeros(4, 6, 8, 8))
    plain = d.training_losses(model, x0, t, {}, noise=noise)
    floored = d.training_losses(model, x0, t, {}, noise=noise, snr_gamma=gamma, snr_floor=1.0)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    x0_weight = snr.clamp(min=1.0, max=gamma)
    torch.testing.assert_close(floored["mse"], plain["mse"] * (x0_weight / snr).float())
    assert (x0_weight / snr)[2] > 300  # t=750: SNR 0.003, the step weighs 300 times more
    if gamma is None:
        # Clean steps (SNR > 1) keep their weight.
        torch.testing.assert_close(floored["mse"][0], plain["mse"][0])
    torch.testing.assert_close(floored["vb"], plain["vb"])


def test_scheduler_is_dpm_solver_pp_on_the_training_schedule():
    config = make_scheduler().config
    assert config.algorithm_type == "dpmsolver++" and config.solver_order == 2
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("linear", 1e-4, 0.02)
    assert config.prediction_type == "epsilon"


def test_sample_is_seeded_and_guidance_matters():
    model = tiny_model()
    cond = {"cond": torch.randn(2, 16)}
    a = sample(model, (2, 4, 8, 8), cond, steps=4, generator=torch.Generator().manual_seed(0))
    b = sample(model, (2, 4, 8, 8), cond, steps=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = sample(
        model,
        (2, 4, 8, 8),
        cond,
        steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.allclose(a, c)
    assert not model.training, "sample restores the model's mode"


def test_sample_multi_frame():
    model = tiny_model(num_frames=3, frame_embed="index", concat_latent_channels=4)
    kwargs = {
        "cond": torch.randn(1, 16),
        "frame_cond": torch.arange(3)[None],
        "concat_latent": torch.randn(1, 4, 8, 8),
    }
    out = sample(
        model, (1, 3, 4, 8, 8), kwargs, steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (1, 3, 4, 8, 8) and torch.isfinite(out).all()


def test_interpolation_endpoints_are_the_two_images_with_fixed_noise():
    model = tiny_model()
    a, b = torch.randn(16), torch.randn(16)
    noise = torch.randn(1, 4, 8, 8)
    row = interpolate(model, a, b, (4, 8, 8), num=3, steps=3, noise=noise)
    assert row.shape == (3, 4, 8, 8)
    only_a = sample(model, (1, 4, 8, 8), {"cond": a[None]}, steps=3, noise=noise)
    only_b = sample(model, (1, 4, 8, 8), {"cond": (b * 7)[None]}, steps=3, noise=noise)
    # The random tiny model's latents reach a few hundred: a batch of 3 and a batch of 1 round
    # differently by about 1e-6 of that (float64 agrees exactly); the blends differ by units.
    torch.testing.assert_close(row[:1], only_a, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(row[2:], only_b, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(row[1], row[0])
