"""The in-plane median of a parameter map within a mask (``denoise.median_in_mask``) and its window."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.perfusion.denoise import median_in_mask, median_window


@pytest.mark.parametrize(
    ("window_mm", "pixel_mm", "size"), [(0.0, 0.9, 0), (3.0, 0.9, 3), (3.0, 1.25, 3), (3.0, 0.6, 5), (3.0, 0.45, 7)]
)
def test_window_is_the_odd_pixel_count_nearest_to_the_width_in_mm(window_mm, pixel_mm, size):
    assert median_window(window_mm, pixel_mm) == size


def test_outliers_go_and_a_step_edge_stays_where_it_is():
    volume = np.zeros((2, 20, 20), dtype=np.float32)
    volume[:, :, 10:] = 10.0  # a step between two tissues at column 10
    spikes = np.zeros(volume.shape, dtype=bool)
    spikes[:, 1::4, 2::4] = True  # isolated: at most one in any 3 x 3 window
    noisy = np.where(spikes, np.float32(100.0), volume)
    mask = np.ones(volume.shape, dtype=bool)
    out = median_in_mask(noisy, mask, 3)
    interior = (slice(None), slice(1, -1), slice(1, -1))
    assert np.abs(out - volume)[interior].max() == 0.0  # isolated spikes out, the edge not moved
    assert noisy.dtype == out.dtype and not np.shares_memory(out, noisy)


def test_voxels_outside_the_mask_neither_vote_nor_change():
    volume = np.full((1, 9, 9), 5.0, dtype=np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[0, 2:7, 2:7] = True
    volume[~mask] = 1000.0  # e.g. a vessel or CSF beside the tissue
    out = median_in_mask(volume, mask, 5)
    np.testing.assert_array_equal(out[mask], 5.0)  # the corner voxels would take 1000 if outside voted
    np.testing.assert_array_equal(out[~mask], 1000.0)


def test_a_window_below_three_pixels_leaves_the_map_unchanged():
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    np.testing.assert_array_equal(median_in_mask(volume, np.ones(volume.shape, dtype=bool), 1), volume)
