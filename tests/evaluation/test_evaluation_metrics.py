"""Issue 10's metrics on hand-made series with known answers: offsets, curves, peaks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctp_node.evaluation.metrics import (
    curve_rmse,
    difference_stats,
    mean_curve,
    peak_error,
)

RNG = np.random.default_rng(1)
TRUTH = RNG.uniform(10.0, 60.0, size=(5, 2, 6, 6)).astype(np.float32)
REGION = np.zeros((2, 6, 6), bool)
REGION[:, 1:4, 1:4] = True
SYNTHETIC = np.array([False, True, True, True, False])


def test_offset_counts_only_the_selected_frames_and_the_region():
    candidate = TRUTH.copy()
    candidate[1][REGION] += 2.0
    candidate[2][REGION] -= 1.0
    candidate[0] += 50.0  # acquired frame: not counted
    candidate[3][~REGION] += 50.0  # outside the region: not counted
    stats = difference_stats(candidate, TRUTH, REGION, SYNTHETIC)
    assert stats.mean_hu == pytest.approx((2.0 - 1.0 + 0.0) / 3)
    assert stats.mean_abs_hu == pytest.approx((2.0 + 1.0 + 0.0) / 3)
    assert stats.worst_frame_mean_hu == pytest.approx(2.0)
    assert stats.n_voxels == int(REGION.sum())


def test_offset_of_an_empty_region_is_nan_and_bad_inputs_raise():
    assert math.isnan(difference_stats(TRUTH, TRUTH, np.zeros_like(REGION), SYNTHETIC).mean_hu)
    with pytest.raises(ValueError, match="non-empty"):
        difference_stats(TRUTH, TRUTH, REGION, np.zeros(5, bool))
    with pytest.raises(ValueError, match="region"):
        difference_stats(TRUTH, TRUTH, REGION[0], SYNTHETIC)
    with pytest.raises(ValueError, match="shape"):
        difference_stats(TRUTH[:4], TRUTH, REGION, SYNTHETIC)


def test_curve_rmse_compares_mean_curves_not_voxels():
    candidate = TRUTH.copy()
    # Voxel noise with zero mean in the region leaves the mean curve unchanged...
    flip = np.where(np.arange(REGION.sum()) % 2 == 0, 5.0, -5.0).astype(np.float32)
    for t in range(5):
        candidate[t][REGION] += flip
    assert curve_rmse(candidate, TRUTH, REGION, SYNTHETIC) == pytest.approx(0.0, abs=1e-5)
    # ...a shift of the mean curve in two of three synthetic frames does not.
    candidate[1][REGION] += 3.0
    candidate[2][REGION] += 3.0
    assert curve_rmse(candidate, TRUTH, REGION, SYNTHETIC) == pytest.approx(math.sqrt(2 * 9 / 3), rel=1e-5)
    assert mean_curve(TRUTH, REGION).shape == (5,)
    assert np.isnan(mean_curve(TRUTH, np.zeros_like(REGION))).all()


def test_peak_error_is_signed_height_and_time():
    times = np.arange(6, dtype=float)
    truth = np.array([0, 100, 460, 300, 100, 0], float)
    linear = np.array([0, 100, 200, 401, 100, 0], float)
    peak = peak_error(linear, truth, times)
    assert (peak.height_hu, peak.time_s) == (-59.0, 1.0)
    assert (peak.reference_height_hu, peak.reference_time_s) == (460.0, 2.0)
    with pytest.raises(ValueError, match="equal-length"):
        peak_error(linear[:4], truth, times)
