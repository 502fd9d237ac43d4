import inspect

import numpy as np
import pytest
import torch

from model.samplers import (
    SAMPLER_FUNCTIONS,
    SAMPLERS,
    SPACINGS,
    ScheduleSpec,
    fast_alphas_cumprod,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
)
from model.schedule import NoiseSchedule

torch.manual_seed(0)
X0 = torch.rand(2, 1, 4, 8, 8) * 1.8 - 0.9


def oracle(x, g):
    """Returns the exact noise that turns X0 into x at noise level g."""
    g = g.reshape(-1, 1, 1, 1, 1).double()
    return ((x.double() - g * X0.double()) / torch.sqrt(1 - g**2)).float()


@pytest.mark.parametrize("steps", [1500, 50])
def test_ancestral_with_oracle_recovers_clean_volume(steps):
    x = torch.randn_like(X0)
    out = sample_ancestral(oracle, x, ScheduleSpec(), steps, generator=torch.Generator().manual_seed(1))
    assert (out - X0).abs().max().item() < 1e-3


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m])
def test_fast_samplers_with_oracle_recover_clean_volume(sampler, spacing):
    out = sampler(oracle, torch.randn_like(X0), NoiseSchedule.build(), 10, spacing=spacing)
    assert (out - X0).abs().max().item() < 1e-3


def test_ancestral_step_matches_the_published_posterior(seed_dir):
    """The first step of a two-step loop, redone by hand from the buffers of the published checkpoint."""
    stored = torch.load(seed_dir / "seed_format_tiny_checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
    two = NoiseSchedule(NoiseSchedule.build().betas[:2])  # its steps 1 and 0 are the published ones
    torch.manual_seed(5)
    x = torch.randn(1, 1, 2, 4, 4)
    eps = torch.randn_like(x)
    states, levels = [], []

    def record(xx, g):
        states.append(xx.clone())
        levels.append(float(g[0]))
        return eps

    sample_ancestral(record, x, two, 2, generator=torch.Generator().manual_seed(9))
    i = 1
    assert levels[0] == pytest.approx(float(stored["module.sqrt_alphas_cumprod"][i]), rel=1e-6)
    x0 = stored["module.sqrt_recip_alphas_cumprod"][i] * x - stored["module.sqrt_recipm1_alphas_cumprod"][i] * eps
    mean = stored["module.posterior_mean_coef1"][i] * x0.clamp(-1, 1) + stored["module.posterior_mean_coef2"][i] * x
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    expected = mean + torch.exp(0.5 * stored["module.posterior_log_variance_clipped"][i]) * z
    torch.testing.assert_close(states[1], expected, rtol=1e-5, atol=1e-6)


def _gaussian_eps(scale: float):
    """Exact noise prediction when every clean voxel is N(0, scale^2) (Bayes-optimal denoiser)."""

    def eps(x, g):
        g = g.reshape(-1, 1, 1, 1, 1).double()
        x = x.double()
        x0_hat = g * scale**2 / (g**2 * scale**2 + 1 - g**2) * x
        return ((x - g * x0_hat) / torch.sqrt(1 - g**2)).float()

    return eps


def test_dpmpp_2m_is_higher_order_than_ddim_on_the_probability_flow():
    """Gaussian data have a closed-form probability-flow ODE: x0 = x_T / sqrt(abar_T) * s / sqrt(s^2 + sigma_T^2)."""
    scale = 0.2  # keeps the exact x0 inside [-1, 1], so clipping plays no part
    levels = fast_alphas_cumprod(NoiseSchedule.build(), 8, "logsnr")
    x_t = torch.randn(4, 1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_t = np.sqrt((1 - levels[0]) / levels[0])
    exact = x_t.double() / np.sqrt(levels[0]) * scale / np.sqrt(scale**2 + sigma_t**2)
    schedule = NoiseSchedule.build()
    err_ddim = (sample_ddim(_gaussian_eps(scale), x_t, schedule, 8).double() - exact).abs().max().item()
    err_dpm = (sample_dpmpp_2m(_gaussian_eps(scale), x_t, schedule, 8).double() - exact).abs().max().item()
    assert err_dpm < err_ddim / 3
    assert err_dpm < 0.05
    levels = fast_alphas_cumprod(NoiseSchedule.build(), 32, "logsnr")
    x_t32 = x_t
    exact32 = x_t32.double() / np.sqrt(levels[0]) * scale / np.sqrt(scale**2 + sigma_t**2)
    assert (sample_dpmpp_2m(_gaussian_eps(scale), x_t32, schedule, 32).double() - exact32).abs().max().item() < 0.01


@pytest.mark.parametrize("spacing", SPACINGS)
def test_fast_levels_stay_in_the_trained_range(spacing):
    sched = NoiseSchedule.build()
    levels = fast_alphas_cumprod(sched, 12, spacing)
    assert len(levels) == 12 and np.all(np.diff(levels) > 0)
    assert levels[0] == pytest.approx(sched.alphas_cumprod[-1], rel=1e-6)
    assert levels[-1] == pytest.approx(sched.alphas_cumprod[0], rel=1e-6)
    with pytest.raises(ValueError):
        fast_alphas_cumprod(sched, 0, spacing)


def test_every_sampler_has_the_one_signature():
    assert tuple(SAMPLER_FUNCTIONS) == SAMPLERS
    signatures = {name: list(inspect.signature(fn).parameters) for name, fn in SAMPLER_FUNCTIONS.items()}
    assert all(params == signatures["ddim"] for params in signatures.values()), signatures


def test_ancestral_with_fewer_steps_rebuilds_the_given_schedule_kind():
    """Fewer steps keep the schedule's kind and betas: a cosine spec is not sampled as the linear default."""
    seen = {}

    def levels_of(spec):
        levels = []

        def record(x, g):
            levels.append(float(g[0]))
            return torch.zeros_like(x)

        sample_ancestral(record, torch.zeros(1, 1, 1, 2, 2), spec, 5, generator=torch.Generator().manual_seed(0))
        return levels

    seen["linear"] = levels_of(ScheduleSpec())
    seen["cosine"] = levels_of(ScheduleSpec("cosine", 1500))
    expected = np.sqrt(NoiseSchedule.build("cosine", 5).alphas_cumprod[::-1])
    np.testing.assert_allclose(seen["cosine"], expected, rtol=1e-6)
    assert not np.allclose(seen["cosine"], seen["linear"])
    with pytest.raises(ValueError, match="ScheduleSpec"):
        sample_ancestral(oracle, torch.zeros_like(X0), NoiseSchedule.build(), 5)


def test_a_stored_schedule_runs_as_stored_and_refuses_a_rebuild():
    betas = tuple(NoiseSchedule.build("quad", 20).betas)
    spec = ScheduleSpec("stored", 20, betas=betas)
    np.testing.assert_array_equal(spec.build().betas, np.asarray(betas))
    out = sample_ddim(oracle, torch.randn_like(X0), spec, 10)
    assert (out - X0).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        sample_ancestral(oracle, torch.randn_like(X0), spec, 5)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        ScheduleSpec("sigmoid")
