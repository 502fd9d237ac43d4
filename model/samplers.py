"""Samplers over a noise-predicting denoiser conditioned on the continuous noise level g = sqrt(abar).

Every sampler is a small function with one signature (``Sampler``, after k-diffusion),
``sample_x(eps_fn, x, schedule, steps, *, spacing, generator, callback) -> x0``: it owns neither the
network nor the conditioning, and ``SAMPLER_FUNCTIONS`` maps each name to its function, so a caller
never branches on names. ``eps_fn(x, g)`` takes the noisy batch in the published
variance-preserving space, ``x = g x0 + sqrt(1 - g^2) eps``, and the per-sample noise level ``g`` of
shape (B,), and returns the predicted noise. ``schedule``: the schedule the network was trained
with (``ScheduleSpec``, e.g. a checkpoint's; a bare ``NoiseSchedule`` where no fewer-step rebuild is
needed); ``steps``: how many network evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from model.progress import ProgressFn
from model.schedule import (
    PUBLISHED_LINEAR_END,
    PUBLISHED_LINEAR_START,
    PUBLISHED_SCHEDULE,
    PUBLISHED_TIMESTEPS,
    SCHEDULES,
    NoiseSchedule,
)

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SamplerName = Literal["ancestral", "ddim", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = ("ancestral", "ddim", "dpmpp_2m")
Spacing = Literal["uniform", "karras", "logsnr"]
SPACINGS: tuple[str, ...] = ("uniform", "karras", "logsnr")
STORED_SCHEDULE = "stored"  # betas read from a file that match no named schedule


@dataclass(frozen=True)
class ScheduleSpec:
    """The noise schedule a network was trained with, as a recipe: it can be rebuilt with fewer steps
    (same kind, same start and end betas), as the authors do for the ancestral sampler.

    ``betas``: a schedule stored in a file that matches no named one (``name == "stored"``); it is
    used as it is and cannot be rebuilt with fewer steps.
    """

    name: str = PUBLISHED_SCHEDULE
    timesteps: int = PUBLISHED_TIMESTEPS
    beta_start: float = PUBLISHED_LINEAR_START
    beta_end: float = PUBLISHED_LINEAR_END
    betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name == STORED_SCHEDULE:
            if not self.betas:
                raise ValueError("a stored schedule needs its betas")
        elif self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; one of {', '.join(SCHEDULES)}")
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise ValueError(f"schedule timesteps must be an integer >= 1, got {self.timesteps!r}")

    def build(self, steps: int | None = None) -> NoiseSchedule:
        """The schedule with ``steps`` discrete steps (default: as trained)."""
        if self.name == STORED_SCHEDULE:
            assert self.betas is not None
            if steps not in (None, len(self.betas)):
                raise ValueError(
                    f"the stored schedule ({len(self.betas)} steps) matches no named schedule, so it cannot be "
                    f"rebuilt with {steps} steps: use the ancestral sampler with {len(self.betas)} steps, or ddim "
                    "or dpmpp_2m"
                )
            return NoiseSchedule(np.asarray(self.betas, dtype=np.float64))
        return NoiseSchedule.build(self.name, steps or self.timesteps, self.beta_start, self.beta_end)


ScheduleLike = ScheduleSpec | NoiseSchedule


def _full_schedule(schedule: ScheduleLike) -> NoiseSchedule:
    return schedule.build() if isinstance(schedule, ScheduleSpec) else schedule


class Sampler(Protocol):
    """The one signature every sampler has."""

    def __call__(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        schedule: ScheduleLike,
        steps: int,
        *,
        spacing: Spacing = "logsnr",
        generator: torch.Generator | None = None,
        callback: ProgressFn | None = None,
    ) -> torch.Tensor: ...


def _levels(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=torch.float32)


def predict_x0(x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps (published `predict_start_from_noise`)."""
    return (1.0 / abar) ** 0.5 * x - (1.0 / abar - 1.0) ** 0.5 * eps


def sample_ancestral(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: ScheduleLike,
    steps: int,
    *,
    spacing: Spacing = "logsnr",
    generator: torch.Generator | None = None,
    callback: ProgressFn | None = None,
) -> torch.Tensor:
    """The published ancestral DDPM loop (SR3 `p_sample_loop`), x0 clipped to [-1, 1] at every step.

    For fewer steps than trained the schedule is rebuilt with ``steps`` steps and the same kind,
    start and end betas, as the authors do (``ScheduleSpec.build(steps)``); ``spacing`` does not apply.
    """
    del spacing
    full = _full_schedule(schedule)
    if steps == full.num_timesteps:
        schedule = full
    elif isinstance(schedule, ScheduleSpec):
        schedule = schedule.build(steps)
    else:
        raise ValueError(
            f"the ancestral sampler needs the schedule's recipe (a ScheduleSpec) to run {steps} of its "
            f"{full.num_timesteps} steps"
        )
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
    schedule: ScheduleLike,
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
    abar = _full_schedule(schedule).alphas_cumprod
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
    schedule: ScheduleLike,
    steps: int,
    *,
    spacing: Spacing = "logsnr",
    generator: torch.Generator | None = None,
    callback: ProgressFn | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, Song et al. 2021) with x0 clipped to [-1, 1] as in the published loop.

    Visits ``fast_alphas_cumprod(schedule, steps, spacing)``, noisiest first; the last step lands on x0.
    """
    del generator  # deterministic given the initial noise
    alphas_cumprod = fast_alphas_cumprod(schedule, steps, spacing)
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
    schedule: ScheduleLike,
    steps: int,
    *,
    spacing: Spacing = "logsnr",
    generator: torch.Generator | None = None,
    callback: ProgressFn | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in data prediction, deterministic.

    Runs in the variance-exploding view ``x / sqrt(abar)`` with sigma = sqrt((1 - abar) / abar) (as
    k-diffusion does); the final step goes to sigma = 0 and returns the last clipped x0 estimate.
    Visits ``fast_alphas_cumprod(schedule, steps, spacing)``.
    """
    del generator
    abar = np.asarray(fast_alphas_cumprod(schedule, steps, spacing), dtype=np.float64)
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


SAMPLER_FUNCTIONS: dict[str, Sampler] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}
