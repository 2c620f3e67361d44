"""DDPM with linear betas, epsilon prediction and learned variance (improved DDPM's hybrid loss).

Follows openai/improved-diffusion and DiT's `gaussian_diffusion.py` in the one configuration
Lumos uses: `loss = mse(eps) + vb`, the variance learned as an interpolation between beta_t and
the posterior variance ("learned range"), the vb term trained with the mean stop-gradiented so it
only teaches the variance. Works for latents (B, C, H, W) and multi-frame latents (B, F, C, H, W):
the channel axis is always dim -3.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised into 256 bins (decoder term)."""
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError("shapes of x, means, log_scales differ")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """Linear-beta DDPM; schedule tables in float64, gathered per sample and cast on use."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if not (0 < beta_start < beta_end < 1):
            raise ValueError(f"need 0 < {beta_start=} < {beta_end=} < 1")
        self.num_timesteps = num_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)  # signal-to-noise ratio per step
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip the log to the t = 1 value (improved DDPM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        )

    @staticmethod
    def _extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1) broadcastable against `like`, in like's dtype."""
        out = table.to(t.device)[t].to(like.dtype)  # (B,)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch_size: int, device: torch.device | str = "cpu", generator=None):
        return torch.randint(
            0, self.num_timesteps, (batch_size,), device=device, generator=generator
        )

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} != x0 {tuple(x0.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_logvar(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of p(x_{t-1} | x_t) from (eps, v) (learned range variance)."""
        c = x_t.shape[-3]
        if model_output.shape[-3] != 2 * c:
            raise ValueError(
                f"learned variance needs 2C={2 * c} output channels, got {model_output.shape[-3]}"
            )
        eps, var_values = model_output.split(c, dim=-3)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(torch.log(self.betas), t, x_t)
        frac = (var_values + 1) / 2  # the model outputs v in [-1, 1]
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, log_variance

    def training_losses(
        self,
        model,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        snr_gamma: float | None = None,
        snr_floor: float | None = None,
        prediction_type: str = "epsilon",
    ) -> dict[str, torch.Tensor]:
        """Per-sample hybrid loss {"loss", "mse", "vb"} each (B,); average them for the step.

        snr_gamma: Min-SNR-gamma weighting of the epsilon term (Hang et al. 2023, as diffusers'
        training scripts' --snr_gamma): each step's mse is scaled by min(SNR_t, gamma) / SNR_t,
        which lowers the weight of the nearly clean steps that otherwise dominate the loss (the
        noisy steps, where the layout and the condition are decided, keep weight 1). The vb term
        is not weighted. None: the plain sum (the paper's recipe).

        snr_floor: truncated-SNR weighting (Salimans & Ho 2022, used by Imagen Video): in x0 terms
        the epsilon mse weighs each step's x0 error by SNR_t, which all but vanishes at high noise
        (SNR 0.003 at t=750), where the layout is decided; a floor weighs it at least `snr_floor`.
        With both, the x0 weight is SNR_t clamped to [snr_floor, snr_gamma].

        prediction_type "v_prediction": the model outputs v = sqrt(a) eps - sqrt(1 - a) x0 and the
        mse is on v, which weighs the x0 error by SNR_t + 1 (never below 1). An epsilon model
        cannot give x0 at high noise: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error
        by 1 / sqrt(SNR_t), 157 at t=999; v is x0 there, up to sign. snr_gamma / snr_floor
        weigh the same x0 error as with epsilon (Min-SNR's v weight min(SNR, g) / (SNR + 1))."""
        model_kwargs = model_kwargs or {}
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must be (B,), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # (B, [F,] C, H, W)
        output = model(x_t, t, **model_kwargs)  # (B, [F,] 2C, H, W)
        c = x0.shape[-3]
        if output.shape[:-3] != x0.shape[:-3] or output.shape[-3] != 2 * c:
            raise ValueError(
                f"model output {tuple(output.shape)} does not match x0 {tuple(x0.shape)} with 2C channels"
            )
        output = output.float()
        pred, var_values = output.split(c, dim=-3)
        if prediction_type == "v_prediction":
            target = self.v_target(x0.float(), noise.float(), t)
            eps = self.eps_from_v(pred, x_t.float(), t)
        elif prediction_type == "epsilon":
            target, eps = noise.float(), pred
        else:
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
            )
        # The vb term learns only the variance: the mean comes from a stop-gradiented epsilon.
        frozen = torch.cat([eps.detach(), var_values], dim=-3)
        vb = self._vb_terms_bpd(frozen, x0.float(), x_t.float(), t)
        mse = mean_flat((target - pred) ** 2)
        if snr_gamma is not None or snr_floor is not None:
            snr = self._extract(self.snr, t, mse)
            # The mse weighs the x0 error by SNR (epsilon) or SNR + 1 (v): re-weigh it to the clamp.
            native = snr + 1 if prediction_type == "v_prediction" else snr
            mse = mse * snr.clamp(min=snr_floor, max=snr_gamma) / native
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022; diffusers' get_velocity)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def eps_from_v(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(a) v + sqrt(1 - a) x_t, the epsilon a v prediction implies."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_t) * v
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def _vb_terms_bpd(self, model_output, x0, x_t, t) -> torch.Tensor:
        true_mean, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        mean, logvar = self.p_mean_logvar(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * logvar)
        nll = mean_flat(nll) / math.log(2.0)
        # At t = 0 the bound is the decoder's negative log-likelihood, else the KL.
        return torch.where(t == 0, nll, kl)
