"""Noise schedules of the published model, rebuilt exactly as the authors do (SR3 conventions).

Everything is computed in float64 numpy and handed to torch as float32, as the published code does,
so the values equal the buffers stored in its checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScheduleName = Literal["linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine"]
SCHEDULES: tuple[str, ...] = ("linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine")

PUBLISHED_SCHEDULE = "linear"
PUBLISHED_TIMESTEPS = 1500
PUBLISHED_LINEAR_START = 1e-6
PUBLISHED_LINEAR_END = 1e-2


def _warmup_betas(start: float, end: float, n: int, warmup_frac: float) -> np.ndarray:
    betas = end * np.ones(n, dtype=np.float64)
    warmup = int(n * warmup_frac)
    betas[:warmup] = np.linspace(start, end, warmup, dtype=np.float64)
    return betas


def make_betas(
    schedule: str = PUBLISHED_SCHEDULE,
    n_timestep: int = PUBLISHED_TIMESTEPS,
    linear_start: float = PUBLISHED_LINEAR_START,
    linear_end: float = PUBLISHED_LINEAR_END,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Beta schedule (float64), the published `make_beta_schedule`."""
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got {n_timestep}")
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "quad":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "warmup10":
        return _warmup_betas(linear_start, linear_end, n_timestep, 0.1)
    if schedule == "warmup50":
        return _warmup_betas(linear_start, linear_end, n_timestep, 0.5)
    if schedule == "const":
        return linear_end * np.ones(n_timestep, dtype=np.float64)
    if schedule == "jsd":
        return 1.0 / np.linspace(n_timestep, 1, n_timestep, dtype=np.float64)
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], None, 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete schedule and every quantity the published sampler derives from it (float64)."""

    betas: np.ndarray

    @classmethod
    def build(
        cls,
        schedule: str = PUBLISHED_SCHEDULE,
        n_timestep: int = PUBLISHED_TIMESTEPS,
        linear_start: float = PUBLISHED_LINEAR_START,
        linear_end: float = PUBLISHED_LINEAR_END,
    ) -> NoiseSchedule:
        return cls(make_betas(schedule, n_timestep, linear_start, linear_end))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def sqrt_alphas_cumprod_prev(self) -> np.ndarray:
        """gamma_prev = sqrt([1, abar_1, ..., abar_T]), T + 1 values: the training noise-level bins."""
        return np.sqrt(np.append(1.0, self.alphas_cumprod))

    def buffers(self) -> dict[str, np.ndarray]:
        """The 12 buffers the published GaussianDiffusion registers, by their published names."""
        betas = self.betas
        abar = self.alphas_cumprod
        abar_prev = self.alphas_cumprod_prev
        one_minus = 1.0 - abar
        # 1 - abar is 0 while every beta so far is 0 (a schedule starting at beta 0), and abar is 0 after a
        # beta of 1 (``jsd``'s last step). The published formulas divide by them there (NumPy warns); the
        # values are their limits instead: the posterior is x0 itself (coefficients 1 and 0, variance 0),
        # log(0) is -inf and 1 / 0 is inf. Everywhere else the divisions are the published ones, bit for bit.
        defined = one_minus != 0
        posterior_variance = _divide(betas * (1.0 - abar_prev), one_minus, defined, 0.0)
        recip_abar = _divide(np.ones_like(abar), abar, abar != 0, np.inf)
        return {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(one_minus),
            "log_one_minus_alphas_cumprod": np.log(one_minus, out=np.full_like(one_minus, -np.inf), where=defined),
            "sqrt_recip_alphas_cumprod": np.sqrt(recip_abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(recip_abar - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": _divide(betas * np.sqrt(abar_prev), one_minus, defined, 1.0),
            "posterior_mean_coef2": _divide((1.0 - abar_prev) * np.sqrt(1.0 - betas), one_minus, defined, 0.0),
        }


def _divide(numerator: np.ndarray, denominator: np.ndarray, where: np.ndarray, limit: float) -> np.ndarray:
    """``numerator / denominator`` where ``where``, ``limit`` elsewhere (no division by zero)."""
    return np.divide(numerator, denominator, out=np.full_like(numerator, limit), where=where)


SCHEDULE_BUFFER_NAMES: tuple[str, ...] = tuple(NoiseSchedule(np.array([0.5])).buffers())
