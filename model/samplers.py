"""Samplers over a noise-predicting denoiser conditioned on the continuous noise level g = sqrt(abar).

Every sampler is a small function with one signature, ``sample_x(eps_fn, x, ..., generator,
callback) -> x0`` (after k-diffusion): it owns neither the network nor the conditioning. ``eps_fn(x,
g)`` takes the noisy batch in the published variance-preserving space, ``x = g x0 + sqrt(1 - g^2)
eps``, and the per-sample noise level ``g`` of shape (B,), and returns the predicted noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from model.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]
SamplerName = Literal["ancestral", "ddim", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = ("ancestral", "ddim", "dpmpp_2m")
Spacing = Literal["uniform", "karras", "logsnr"]
SPACINGS: tuple[str, ...] = ("uniform", "karras", "logsnr")


def _levels(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=torch.float32)


def predict_x0(x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps (published `predict_start_from_noise`)."""
    return (1.0 / abar) ** 0.5 * x - (1.0 / abar - 1.0) ** 0.5 * eps


def sample_ancestral(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The published ancestral DDPM loop (SR3 `p_sample_loop`), x0 clipped to [-1, 1] at every step.

    For fewer steps the caller rebuilds the schedule with the same start and end betas, as the
    authors do (``NoiseSchedule.build(n_timestep=steps)``).
    """
    buffers = schedule.buffers()
    abar = buffers["alphas_cumprod"]
    coef1, coef2 = buffers["posterior_mean_coef1"], buffers["posterior_mean_coef2"]
    log_var = buffers["posterior_log_variance_clipped"]
    total = schedule.num_timesteps
    for step, i in enumerate(reversed(range(total))):
        eps = eps_fn(x, _levels(abar[i] ** 0.5, x)).to(x.dtype)
        x0 = predict_x0(x, eps, float(abar[i])).clamp(-1.0, 1.0)
        mean = float(coef1[i]) * x0 + float(coef2[i]) * x
        if i > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + float(np.exp(0.5 * log_var[i])) * noise
        else:
            x = mean
        if callback is not None:
            callback(step + 1, total)
    return x


def fast_alphas_cumprod(
    schedule: NoiseSchedule,
    steps: int,
    spacing: Spacing = "logsnr",
    rho: float = 7.0,
) -> np.ndarray:
    """``steps`` noise levels (as abar, noisiest first) inside the range the network was trained on.

    ``uniform`` spaces the discrete training steps evenly (DDIM); ``karras`` spaces sigma = sqrt((1 -
    abar) / abar) by Karras et al. (2022) with ``rho``; ``logsnr`` spaces log(abar / (1 - abar)) evenly.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    abar = schedule.alphas_cumprod
    if spacing == "uniform":
        idx = np.round(np.linspace(len(abar) - 1, 0, steps)).astype(int)
        return abar[idx]
    sigma_max = np.sqrt((1 - abar[-1]) / abar[-1])
    sigma_min = np.sqrt((1 - abar[0]) / abar[0])
    if spacing == "karras":
        ramp = np.linspace(0, 1, steps)
        sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif spacing == "logsnr":
        sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return 1.0 / (1.0 + sigmas**2)


def sample_ddim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alphas_cumprod: np.ndarray,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, Song et al. 2021) with x0 clipped to [-1, 1] as in the published loop.

    ``alphas_cumprod``: the noise levels to visit, noisiest first; the last step lands on x0.
    """
    del generator  # deterministic given the initial noise
    total = len(alphas_cumprod)
    for step, abar in enumerate(alphas_cumprod):
        abar = float(abar)
        eps = eps_fn(x, _levels(abar**0.5, x)).to(x.dtype)
        x0 = predict_x0(x, eps, abar).clamp(-1.0, 1.0)
        if step + 1 == total:
            x = x0
        else:
            # Re-derive the noise from the clipped x0 so both stay consistent with x.
            eps = (x - abar**0.5 * x0) / (1.0 - abar) ** 0.5
            nxt = float(alphas_cumprod[step + 1])
            x = nxt**0.5 * x0 + (1.0 - nxt) ** 0.5 * eps
        if callback is not None:
            callback(step + 1, total)
    return x


def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alphas_cumprod: np.ndarray,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in data prediction, deterministic.

    Runs in the variance-exploding view ``x / sqrt(abar)`` with sigma = sqrt((1 - abar) / abar) (as
    k-diffusion does); the final step goes to sigma = 0 and returns the last clipped x0 estimate.
    """
    del generator
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    sigmas = np.append(np.sqrt((1.0 - abar) / abar), 0.0)
    total = len(abar)
    x_ve = x / float(abar[0]) ** 0.5
    old_x0: torch.Tensor | None = None
    for i in range(total):
        alpha = 1.0 / (1.0 + sigmas[i] ** 2) ** 0.5
        eps = eps_fn(x_ve * alpha, _levels(alpha, x)).to(x.dtype)
        x0 = (x_ve - sigmas[i] * eps).clamp(-1.0, 1.0)
        if sigmas[i + 1] == 0:
            x_ve = x0
        else:
            t, t_next = -np.log(sigmas[i]), -np.log(sigmas[i + 1])
            h = t_next - t
            if old_x0 is None:
                denoised = x0
            else:
                h_last = t - (-np.log(sigmas[i - 1]))
                r = h_last / h
                denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x_ve = float(sigmas[i + 1] / sigmas[i]) * x_ve - float(np.expm1(-h)) * denoised
        old_x0 = x0
        if callback is not None:
            callback(i + 1, total)
    return x_ve
