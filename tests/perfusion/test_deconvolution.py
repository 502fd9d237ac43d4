"""Deconvolution on analytic curves: C = CBF/6000 * (AIF conv R(. - delay)), AIF a gamma variate."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.perfusion import deconvolution as dec
from ctp_node.perfusion import timing
from tests.perfusion.synthetic import gamma_aif, tissue_curve

TIMES = np.arange(0.0, 61.0, 1.0)
AIF = gamma_aif(TIMES)
CASES = [(53.0, 3.7, 1.0), (25.0, 4.6, 1.0), (16.0, 11.3, 4.0), (60.0, 4.0, 0.0), (30.0, 6.0, 2.5)]


def _cbf(stats: dec.ResidueStats) -> float:
    return float(stats.flow[0] * 6000.0)


def test_fourier_filter_is_the_truncated_svd_of_the_block_circulant_matrix():
    curve = tissue_curve(TIMES, 40.0, 5.0, 3.0, "exp")
    n_fft = dec.fft_length(TIMES.size)
    padded = np.zeros(n_fft)
    padded[: TIMES.size] = AIF
    matrix = np.stack([np.roll(padded, j) for j in range(n_fft)], axis=1)  # column j = AIF delayed by j
    u, s, vt = np.linalg.svd(matrix)
    keep = s >= 0.1 * s.max()
    c = np.zeros(n_fft)
    c[: TIMES.size] = curve
    explicit = vt[keep].T @ ((u[:, keep].T @ c) / s[keep])  # step 1 s
    fourier = dec.residues(curve[None], AIF, 1.0, threshold=0.1)[0]
    np.testing.assert_allclose(fourier, explicit, atol=1e-5 * np.abs(explicit).max())


@pytest.mark.parametrize(("cbf", "mtt", "delay"), CASES)
def test_box_residue_recovers_cbf_and_tmax_within_the_plateau(cbf, mtt, delay):
    """A box has no sharp peak to lose; truncation rings at its edges (Gibbs), up to ~+17 %."""
    curve = tissue_curve(TIMES, cbf, mtt, delay, "box")
    stats = dec.deconvolve_bsvd(curve[None], AIF, 1.0)
    assert _cbf(stats) == pytest.approx(cbf, rel=0.2)
    assert delay - 0.5 <= stats.tmax_s[0] <= delay + mtt + 0.5


@pytest.mark.parametrize(("cbf", "mtt", "delay"), CASES)
def test_exponential_residue_shows_the_known_truncation_bias(cbf, mtt, delay):
    """Truncation smooths the sharp onset of R: CBF is underestimated (most at short MTT) and the
    peak moves later by 1-2 s. oSVD truncates less where it can and is closer on both counts."""
    curve = tissue_curve(TIMES, cbf, mtt, delay, "exp")
    bsvd = dec.deconvolve_bsvd(curve[None], AIF, 1.0)
    osvd = dec.deconvolve_osvd(curve[None], AIF, 1.0)
    assert 0.55 * cbf < _cbf(bsvd) < 1.0 * cbf
    assert _cbf(bsvd) < _cbf(osvd) < 1.05 * cbf
    assert delay < bsvd.tmax_s[0] < delay + 2.6
    assert delay - 0.2 < osvd.tmax_s[0] < bsvd.tmax_s[0]


def test_block_circulant_estimate_does_not_depend_on_delay():
    early = dec.deconvolve_bsvd(tissue_curve(TIMES, 40.0, 5.0, 0.0, "exp")[None], AIF, 1.0)
    late = dec.deconvolve_bsvd(tissue_curve(TIMES, 40.0, 5.0, 6.0, "exp")[None], AIF, 1.0)
    assert _cbf(late) == pytest.approx(_cbf(early), rel=0.03)
    assert late.tmax_s[0] - early.tmax_s[0] == pytest.approx(6.0, abs=0.2)


def test_tmax_is_not_quantised_to_frames():
    delays = np.array([2.0, 2.25, 2.5, 2.75, 3.0])
    curves = np.stack([tissue_curve(TIMES, 40.0, 5.0, d, "exp") for d in delays])
    tmax = dec.deconvolve_bsvd(curves, AIF, 1.0).tmax_s
    np.testing.assert_allclose(np.diff(tmax), 0.25, atol=0.08)


def test_tissue_leading_the_aif_wraps_to_a_negative_tmax():
    """Tissue 4 s ahead of the AIF (AIF from a distal artery): the residue peak wraps around the
    circulant and is read as a negative time (about -4 s plus the ~2 s truncation shift)."""
    leading_aif = gamma_aif(TIMES, t0=12.0)
    stats = dec.deconvolve_bsvd(tissue_curve(TIMES, 40.0, 5.0, 0.0, "exp")[None], leading_aif, 1.0)
    assert -4.0 < stats.tmax_s[0] < -1.0
    lagging = dec.deconvolve_bsvd(tissue_curve(TIMES, 40.0, 5.0, 4.0, "exp")[None], AIF, 1.0)
    assert _cbf(stats) == pytest.approx(_cbf(lagging), rel=0.05)


def test_non_uniform_sampling_resampled_linearly_agrees_with_1s_sampling():
    """1 s for the first 30 s, then 2-4 s and non-integer times, as scanners do."""
    sparse = np.concatenate([np.arange(0.0, 30.0, 1.0), [31.7, 33.9, 36.0, 39.2, 42.5, 46.0, 50.1, 54.3, 58.6]])
    grid = timing.uniform_grid(sparse, 1.0)
    interp = timing.interpolation_matrix(sparse, grid)
    for cbf, mtt, delay in CASES:
        dense = dec.deconvolve_bsvd(tissue_curve(TIMES, cbf, mtt, delay, "exp")[None], AIF, 1.0)
        curve = interp @ tissue_curve(sparse, cbf, mtt, delay, "exp")
        stats = dec.deconvolve_bsvd(curve[None], interp @ gamma_aif(sparse), 1.0)
        assert _cbf(stats) == pytest.approx(_cbf(dense), rel=0.05)
        assert stats.tmax_s[0] == pytest.approx(dense.tmax_s[0], abs=0.3)


def test_noise_is_damped_more_by_osvd_oscillation_bound_than_by_no_truncation():
    rng = np.random.default_rng(1)
    clean = tissue_curve(TIMES, 40.0, 5.0, 1.0, "exp")
    noisy = clean[None] + 1.0 * rng.standard_normal((200, TIMES.size))
    osvd = dec.deconvolve_osvd(noisy, AIF, 1.0)
    loose = dec.deconvolve_bsvd(noisy, AIF, 1.0, threshold=0.01)
    assert np.std(osvd.flow) < 0.5 * np.std(loose.flow)
    assert np.median(osvd.flow * 6000) == pytest.approx(40.0, rel=0.3)


def test_chunking_does_not_change_the_result():
    curves = np.stack([tissue_curve(TIMES, c, m, d, "exp") for c, m, d in CASES])
    whole = dec.deconvolve_osvd(curves, AIF, 1.0)
    chunked = dec.deconvolve_osvd(curves, AIF, 1.0, chunk=2)
    np.testing.assert_allclose(chunked.flow, whole.flow, rtol=1e-6)
    np.testing.assert_allclose(chunked.tmax_s, whole.tmax_s, atol=1e-6)
