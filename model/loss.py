"""SR3-style training objective with a continuous noise level (the published recipe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from model.schedule import NoiseSchedule

LossType = Literal["l1", "l2"]


def sample_noise_levels(
    schedule: NoiseSchedule, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One discrete step t ~ U{1..T} per batch, then g ~ U(gamma_prev[t-1], gamma_prev[t]) per sample.

    The published trainer draws t once per batch (not per sample); kept for fidelity.
    """
    gamma_prev = torch.as_tensor(schedule.sqrt_alphas_cumprod_prev, dtype=torch.float64)
    t = int(torch.randint(1, schedule.num_timesteps + 1, (1,), generator=generator).item())
    low, high = gamma_prev[t - 1], gamma_prev[t]
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (high + (low - high) * u).float()


Prediction = Literal["eps", "x0", "residual"]


def eps_from_output(
    output: torch.Tensor, x_noisy: torch.Tensor, noise_level: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The noise estimate from a network output: itself for ``eps``; from ``x0`` through
    ``x_noisy = g x0 + sqrt(1 - g^2) eps``."""
    if prediction == "eps":
        return output
    if prediction in ("x0", "residual"):
        g = noise_level.to(output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
        return (x_noisy - g * output) / torch.sqrt((1 - g**2).clamp_min(1e-12))
    raise ValueError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'residual'")


def diffusion_loss(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise_level: torch.Tensor,
    loss_type: LossType = "l1",
    noise: torch.Tensor | None = None,
    prediction: Prediction = "eps",
) -> torch.Tensor:
    """Mean L1 (or L2) between the true noise (or, for ``prediction="x0"``, the clean target) and
    ``eps_model(x_noisy, g)``.

    ``prediction="residual"`` networks output the clean target too (interpolation plus correction).
    ``x0`` is the clean target (B, 1, D, H, W); ``eps_model`` wraps the conditioning (left/right
    volumes, contexts) so this function knows only the diffusion maths.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    g = noise_level.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    x_noisy = g * x0 + torch.sqrt(1 - g**2) * noise
    predicted = eps_model(x_noisy, noise_level)
    if prediction not in ("eps", "x0", "residual"):
        raise ValueError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'residual'")
    target = (noise if prediction == "eps" else x0).float()
    if loss_type == "l1":
        return (predicted.float() - target).abs().mean()
    if loss_type == "l2":
        return ((predicted.float() - target) ** 2).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}; choose 'l1' or 'l2'")
