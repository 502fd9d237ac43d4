"""vessel_fit: gamma-variate bolus fits of sparse samples, and the cases where they must not be used."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.phantom.aif import GammaVariate, reference_aif
from ctp_node.series import vessel_fit


def _lagged_normal(t: np.ndarray) -> np.ndarray:
    """A bolus from another family: a Gaussian convolved with an exponential, plus a recirculation step."""
    fine = np.arange(0.0, 120.0, 0.01)
    kernel = np.exp(-fine / 4.0)
    curve = np.convolve(np.exp(-0.5 * ((fine - 15.0) / 2.5) ** 2), kernel / kernel.sum())[: fine.size]
    return np.interp(t, fine, curve / curve.max() * 600.0 + 90.0 / (1.0 + np.exp(-(fine - 27.0) / 3.0)))


def _noisy(curve, times: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (40.0 + curve(times))[:, None] + rng.normal(0.0, noise, (times.size, n))


@pytest.mark.parametrize("curve", [reference_aif, _lagged_normal], ids=["phantom-aif", "lagged-normal"])
def test_peak_between_4_s_samples_is_much_nearer_than_linear(curve):
    """Mean over onsets of the peak error of the voxel-averaged curve, as the AIF of a study is read
    (benchmarks/vessel_fit.py measures the same on whole phantom studies)."""
    errors = {"fit": [], "linear": []}
    for onset in (0.0, 1.0, 2.0, 3.0):
        times = np.arange(0.0, 57.0, 4.0)
        samples = _noisy(lambda t, o=onset: curve(t + o), times, 60, 6.0, seed=int(onset))
        fit = vessel_fit.fit_curves(times, samples, 6.0)
        assert fit.accepted.mean() > 0.9
        seconds = np.arange(0.0, 57.0)
        fitted = np.array([fit.values(t).mean() for t in seconds])
        linear = np.interp(seconds, times, samples.mean(axis=1))
        truth = 40.0 + curve(seconds + onset)
        errors["fit"].append(abs(fitted.max() - truth.max()))
        errors["linear"].append(abs(linear.max() - truth.max()))
    assert np.mean(errors["fit"]) < 0.6 * np.mean(errors["linear"])


def test_filled_curve_passes_exactly_through_the_samples():
    times = np.array([0.0, 3.5, 7.0, 11.0, 15.0, 19.5, 23.0, 27.0, 31.0, 35.0])
    samples = _noisy(GammaVariate(400.0, 6.0, 3.0, 2.0), times, 20, 8.0)
    fit = vessel_fit.fit_curves(times, samples, 8.0)
    assert fit.accepted.all()
    for k, t in enumerate(times):
        np.testing.assert_allclose(fit.values(t), samples[k], atol=1e-6)
    between = fit.values(13.0)
    assert np.all(np.isfinite(between))
    with pytest.raises(ValueError, match="outside the fitted samples"):
        fit.values(36.0)


def test_noise_alone_is_no_candidate_and_a_bolus_is():
    times = np.arange(0.0, 61.0, 4.0)
    quiet = _noisy(lambda t: 0.0 * t, times, 500, 10.0)
    bolus = _noisy(reference_aif, times, 5, 10.0)
    assert not vessel_fit.candidates(quiet, 10.0).any()
    assert vessel_fit.candidates(bolus, 10.0).all()
    assert vessel_fit.enhancement_threshold(3.0) == 40.0 and vessel_fit.enhancement_threshold(10.0) == 60.0
    assert vessel_fit.enhancement(list(bolus))[0] == pytest.approx(vessel_fit.enhancement(bolus)[0])


def test_curves_that_are_no_bolus_are_not_accepted():
    times = np.arange(0.0, 61.0, 4.0)
    n = times.size
    still_rising = 40.0 + 300.0 * np.clip((times - 20.0) / 40.0, 0.0, None) ** 2  # peak after the last sample
    zigzag = 40.0 + np.where(np.arange(n) % 2 == 0, 0.0, 200.0)  # a rise, but nothing like a bolus
    spike_and_drop = np.full(n, 40.0)
    spike_and_drop[n // 2 :] = -300.0  # e.g. motion: a step down after an outlier
    spike_and_drop[n // 2 - 1] = 400.0
    samples = np.column_stack([still_rising, zigzag, spike_and_drop])
    fit = vessel_fit.fit_curves(times, samples, 5.0)
    assert not fit.accepted.any()


def test_too_few_samples_or_bad_input():
    times = np.array([0.0, 8.0, 16.0, 24.0])
    fit = vessel_fit.fit_curves(times, _noisy(reference_aif, times, 3, 5.0), 5.0)
    assert not fit.accepted.any()  # four samples cannot support a six-parameter curve
    with pytest.raises(ValueError, match="samples must be"):
        vessel_fit.fit_curves(times, np.zeros((3, 2)), 5.0)
    with pytest.raises(ValueError, match="increase strictly"):
        vessel_fit.fit_curves(np.array([0.0, 4.0, 4.0, 8.0, 12.0]), np.zeros((5, 2)), 5.0)


def test_noise_estimate_from_two_volumes():
    rng = np.random.default_rng(3)
    base = rng.uniform(20.0, 60.0, (4, 64, 64))
    a, b = base + rng.normal(0, 7.0, base.shape), base + rng.normal(0, 7.0, base.shape)
    b[0, :4, :4] += 300.0  # a few voxels enhance between the two: ignored
    assert vessel_fit.estimate_noise_hu(a, b) == pytest.approx(7.0, rel=0.1)
