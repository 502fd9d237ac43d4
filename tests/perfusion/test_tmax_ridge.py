"""Tmax moved along the delay / transit-time ridge with the MTT median (``tmax_along_ridge``).

A curve pins down its centroid (delay + MTT (1 + 1/shape) / 2) far better than delay and MTT apart;
once the MTT is median-filtered, the delay that keeps each voxel's fitted centroid is the consistent
one. Checked on the analytic head of ``tests/perfusion/synthetic.py`` (independent of the phantom)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.perfusion.synthetic import HEAD_TIMES_S, head_maps, interior, synthetic_head

TIMES_S = HEAD_TIMES_S


def _maps(hu: np.ndarray, ridge: bool):
    return head_maps(hu, tmax_along_ridge=ridge)


@pytest.fixture(scope="module")
def noisy_head():
    return synthetic_head(TIMES_S, noise_hu=6.0, seed=0, size=96)  # large enough for a study residue shape


def test_the_ridge_narrows_tmax_in_normal_tissue_under_noise(noisy_head):
    hu, truth = noisy_head
    normal = interior(truth["normal"], hu.shape[1])
    true_delay = truth["classes"]["normal"][2]
    before, after = _maps(hu, ridge=False), _maps(hu, ridge=True)
    assert after.residue_shape == before.residue_shape == 1.0  # the study's shape: the truth is exponential
    error_before = np.median(np.abs(before.tmax[normal] - true_delay))
    error_after = np.median(np.abs(after.tmax[normal] - true_delay))
    assert error_after < 0.85 * error_before, (error_before, error_after)
    assert abs(np.median(after.tmax[normal]) - true_delay) < 0.2  # and no bias brought in
    np.testing.assert_array_equal(after.cbf, before.cbf)  # only Tmax moves: CBF, CBV, MTT as before
    np.testing.assert_array_equal(after.mtt, before.mtt)


def test_without_noise_the_ridge_changes_no_tmax_inside_a_tissue():
    """A guard, not a test of the ridge itself (noise-free the MTT median moves nothing, so neither does
    Tmax whatever the factor): the option must not move a clean study. The first test covers the ridge."""
    hu, truth = synthetic_head(TIMES_S, noise_hu=0.0, seed=0, size=96)
    before, after = _maps(hu, ridge=False), _maps(hu, ridge=True)
    for name in ("normal", "lesion"):
        inside = interior(truth[name], hu.shape[1])
        np.testing.assert_allclose(after.tmax[inside], before.tmax[inside], atol=1e-3)  # float32 rounding


def test_without_a_study_shape_the_ridge_is_not_applied():
    hu, _ = synthetic_head(TIMES_S, noise_hu=6.0, seed=0, size=48)  # too small to choose one shape
    before, after = _maps(hu, ridge=False), _maps(hu, ridge=True)
    assert before.residue_shape is None
    np.testing.assert_array_equal(after.tmax, before.tmax)
