"""Tmax of low-flow tissue from a wider neighbourhood (``perfusion.low_flow``, ``denoise.tips_filter_at``).

Checked on the analytic head of ``tests/perfusion/synthetic.py`` (independent of the phantoms the
benchmark uses): its lesion (CBF 8 of 50, delay 8 s) is the weak-signal tissue the step is for."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.perfusion import denoise as dn
from tests.perfusion.synthetic import HEAD_TIMES_S, HEAD_VOXEL_ML, head_maps, interior, synthetic_head

TIMES_S, VOXEL_ML = HEAD_TIMES_S, HEAD_VOXEL_ML
LESION_DELAY_S = 8.0


def _maps(hu: np.ndarray, sigma_mm: float):
    return head_maps(hu, low_flow_tmax_sigma_mm=sigma_mm)


@pytest.fixture(scope="module")
def noisy_head():
    return synthetic_head(TIMES_S, noise_hu=6.0, seed=0, size=96)


def test_the_wide_neighbourhood_narrows_tmax_in_low_flow_tissue_and_touches_nothing_else(noisy_head):
    hu, truth = noisy_head
    lesion = interior(truth["lesion"], hu.shape[1])
    normal = interior(truth["normal"], hu.shape[1])
    before, after = _maps(hu, 0.0), _maps(hu, 6.0)
    error_before = np.median(np.abs(before.tmax[lesion] - LESION_DELAY_S))
    error_after = np.median(np.abs(after.tmax[lesion] - LESION_DELAY_S))
    assert error_after < 0.85 * error_before, (error_before, error_after)  # measured 1.32 -> 0.87 s
    assert abs(np.median(after.tmax[lesion]) - LESION_DELAY_S) < 0.5  # narrower, not moved
    assert np.mean(after.tmax[lesion] > 6.0) > np.mean(before.tmax[lesion] > 6.0)
    assert any("low-flow voxels" in note for note in after.notes)
    assert not any("low-flow voxels" in note for note in before.notes)
    # Only Tmax, and only where the flow is low: CBF, CBV, MTT as before, normal tissue's Tmax too.
    for name in ("cbf", "cbv", "mtt"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
    moved = after.tmax != before.tmax
    assert np.mean(moved[normal]) < 0.01
    assert np.all(after.cbf[moved] < 0.5 * after.reference_cbf * 1.05)


def test_at_low_noise_low_flow_tmax_stays_exact():
    hu, truth = synthetic_head(TIMES_S, noise_hu=1.0, seed=0, size=96)
    lesion = interior(truth["lesion"], hu.shape[1])
    maps = _maps(hu, 6.0)
    assert any("low-flow voxels" in note for note in maps.notes)
    assert abs(np.median(maps.tmax[lesion]) - LESION_DELAY_S) < 0.15


def test_without_noise_there_is_nothing_to_pool():
    hu, _ = synthetic_head(TIMES_S, noise_hu=0.0, seed=0, size=96)
    before, after = _maps(hu, 0.0), _maps(hu, 6.0)
    assert not any("low-flow voxels" in note for note in after.notes)  # no noise measured: no filter at all
    np.testing.assert_array_equal(after.tmax, before.tmax)


def _coefficients(seed: int = 0):
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(6, 2, 40, 44)).astype(np.float32)
    coef[:2, :, 10:30, 12:30] += 4.0  # a region whose curves differ from the rest by more than noise
    mask = np.zeros((2, 40, 44), dtype=bool)
    mask[:, 3:37, 4:40] = True
    mask[1, 18:22, 18:22] = False  # a hole (CSF) that must not vote
    noise = dn.NoiseEstimate(sigma_hu=1.0, noise_image=rng.normal(size=mask.shape).astype(np.float32))
    return coef, mask, noise


@pytest.mark.parametrize("sigma_mm", [2.0, 5.0])
@pytest.mark.parametrize("where", ["spread", "one corner of one slice"])
def test_tips_filter_at_is_the_filter_evaluated_at_the_targets(sigma_mm, where):
    coef, mask, noise = _coefficients()
    targets = np.flatnonzero(mask.reshape(-1))[::5]
    if where != "spread":  # only the targets' neighbourhood is gathered: its edges must be right too
        corner = np.zeros(mask.shape, dtype=bool)
        corner[1, 5:9, 30:34] = True
        targets = np.flatnonzero((corner & mask).reshape(-1))
    full = dn.tips_filter(coef, mask, noise, 1.25, spatial_sigma_mm=sigma_mm)
    at = dn.tips_filter_at(coef, mask, targets, noise, 1.25, sigma_mm)
    np.testing.assert_allclose(at, full.reshape(coef.shape[0], -1)[:, targets], atol=1e-5)


def test_tips_filter_at_refuses_targets_outside_the_mask_and_does_nothing_without_noise():
    coef, mask, noise = _coefficients()
    outside = np.flatnonzero(~mask.reshape(-1))[:3]
    with pytest.raises(ValueError, match="inside the mask"):
        dn.tips_filter_at(coef, mask, outside, noise, 1.25, 4.0)
    silent = dn.NoiseEstimate(sigma_hu=0.0, noise_image=noise.noise_image)
    assert dn.tips_filter_at(coef, mask, np.flatnonzero(mask.reshape(-1))[:3], silent, 1.25, 4.0) is None


@pytest.mark.parametrize("mode", ["fit", "wide", "widecomplete"])
def test_the_low_flow_cbf_candidates_change_low_flow_cbf_only(noisy_head, mode):
    hu, truth = noisy_head
    candidate = head_maps(hu, low_flow_cbf=mode)
    default = _maps(hu, 6.0)
    np.testing.assert_array_equal(candidate.tmax, default.tmax)
    np.testing.assert_array_equal(candidate.cbv, default.cbv)
    moved = candidate.cbf != default.cbf
    assert moved.any()
    assert np.all(default.cbf[moved] < 0.5 * default.reference_cbf * 1.05)
    assert any(note.startswith("CBF and Tmax of") for note in candidate.notes)
    lesion = interior(truth["lesion"], hu.shape[1])
    true_cbf = 8.0  # the analytic lesion's, mL/100 g/min: each candidate stays a flow measurement
    assert 0.6 * true_cbf < np.median(candidate.cbf[lesion]) < 1.6 * true_cbf


def test_an_unknown_low_flow_cbf_is_refused(noisy_head):
    from ctp_node.errors import PerfusionError

    with pytest.raises(PerfusionError, match="low_flow_cbf"):
        compute_perfusion(noisy_head[0], TIMES_S, VOXEL_ML, settings=PerfusionSettings(low_flow_cbf="guess"))
