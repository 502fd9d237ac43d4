import numpy as np
import pytest
import torch

from model.loss import diffusion_loss, sample_noise_levels
from model.schedule import SCHEDULE_BUFFER_NAMES, NoiseSchedule, make_betas


def test_schedule_equals_buffers_stored_in_the_published_checkpoint(seed_dir):
    stored = torch.load(seed_dir / "seed_format_tiny_checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
    rebuilt = NoiseSchedule.build().buffers()
    assert set(rebuilt) == set(SCHEDULE_BUFFER_NAMES) and len(rebuilt) == 12
    for name, values in rebuilt.items():
        torch.testing.assert_close(torch.from_numpy(values).float(), stored[f"module.{name}"], rtol=0, atol=0)


def test_published_schedule_endpoints():
    sched = NoiseSchedule.build()
    assert sched.num_timesteps == 1500
    assert sched.betas[0] == pytest.approx(1e-6) and sched.betas[-1] == pytest.approx(1e-2)
    gamma = sched.sqrt_alphas_cumprod_prev
    assert gamma.shape == (1501,) and gamma[0] == 1.0 and np.all(np.diff(gamma) < 0)
    # abar at the last step: exp(sum log(1 - beta)), about 5.4e-4
    assert sched.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-6, 1e-2, 1500)))


def test_other_schedules():
    quad = make_betas("quad", 100, 1e-4, 2e-2)
    assert quad[0] == pytest.approx(1e-4) and quad[-1] == pytest.approx(2e-2)
    warm = make_betas("warmup10", 100, 1e-4, 2e-2)
    assert np.all(warm[10:] == 2e-2) and warm[0] == pytest.approx(1e-4)
    cos = make_betas("cosine", 1000)
    assert cos.max() <= 0.999 and np.all(cos > 0)
    assert np.all(make_betas("const", 10, 1e-4, 3e-3) == 3e-3)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("sigmoid", 10)


def test_training_noise_levels_lie_in_one_published_bin():
    sched = NoiseSchedule.build()
    gamma = sched.sqrt_alphas_cumprod_prev
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        g = sample_noise_levels(sched, 16, gen).double().numpy()
        # All samples of a batch share one bin [gamma[t], gamma[t-1]].
        t = int(np.searchsorted(-gamma, -g.max()))
        assert np.all(g <= gamma[t - 1] + 1e-7) and np.all(g >= gamma[t] - 1e-7)


def test_loss_is_zero_for_the_true_noise_and_known_for_zero_prediction():
    torch.manual_seed(0)
    x0 = torch.rand(4, 1, 4, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    g = torch.full((4,), 0.6)

    def oracle(x_noisy, level):
        gg = level.reshape(-1, 1, 1, 1, 1)
        return (x_noisy - gg * x0) / torch.sqrt(1 - gg**2)

    assert diffusion_loss(oracle, x0, g, "l1", noise).item() == pytest.approx(0, abs=1e-5)
    zero = lambda x, level: torch.zeros_like(x)  # noqa: E731
    assert diffusion_loss(zero, x0, g, "l1", noise).item() == pytest.approx(noise.abs().mean().item())
    assert diffusion_loss(zero, x0, g, "l2", noise).item() == pytest.approx(noise.square().mean().item())
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_loss(zero, x0, g, "huber", noise)


def test_x0_prediction_loss_and_noise_estimate_agree_with_the_noise_form():
    from model.loss import eps_from_output

    torch.manual_seed(1)
    x0 = torch.rand(3, 1, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    g = torch.tensor([0.05, 0.6, 0.999])
    x_noisy = g.reshape(-1, 1, 1, 1, 1) * x0 + torch.sqrt(1 - g**2).reshape(-1, 1, 1, 1, 1) * noise
    # a perfect clean-target network: zero loss, and its noise estimate is the true noise
    oracle = lambda x, level: x0  # noqa: E731
    assert float(diffusion_loss(oracle, x0, g, "l1", noise=noise, prediction="x0")) == 0.0
    assert torch.allclose(eps_from_output(x0, x_noisy, g, "x0"), noise, atol=2e-3)
    assert eps_from_output(noise, x_noisy, g, "eps") is noise
    with pytest.raises(ValueError, match="prediction"):
        eps_from_output(x0, x_noisy, g, "v")
