"""to_model_grid / from_model_grid: skull stripping, windowing, 192 x 192 x 8 slabs, and the way back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from ctp_node.errors import CTPInputError
from ctp_node.grid import (
    GridError,
    from_model_grid,
    second_sources,
    to_model_grid,
)
from ctp_node.phantom import PhantomConfig, generate_phantom
from model.window import to_model_space
from tests.pipeline.conftest import BRAIN_HU, dice, ring_head


def _on_model_grid(grid, mask: np.ndarray) -> np.ndarray:
    image = grid.source.image(mask.astype(np.float32))
    out = sitk.Resample(image, grid.model.image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) > 0.5


def _constant_slabs(grid, n_t1: int, value: float) -> list[np.ndarray]:
    return [np.full((n_t1, 8, 192, 192), value, dtype=np.float32) for _ in grid.slabs]


def _interpolated(series, left: int, right: int, weight: float) -> np.ndarray:
    return (1 - weight) * series.hu[left].astype(np.float64) + weight * series.hu[right].astype(np.float64)


# -- to_model_grid -------------------------------------------------------------------------------------------


def test_phantom_series_becomes_two_slabs_in_model_space(head16):
    grid = to_model_grid(head16.series)
    assert grid.slab_starts == (0, 8)
    assert len(grid.slabs) == 2
    for slab in grid.slabs:
        assert slab.shape == (4, 8, 192, 192) and slab.dtype == np.float32
        assert slab.min() == -1.0 and slab.max() <= 1.0
    assert grid.native_z and grid.model.size == (192, 192, 16)
    assert grid.model.spacing == pytest.approx((1.25, 1.25, 5.0))
    # model slice k is source slice k: same z positions
    assert grid.model.origin[2] == pytest.approx(head16.series.origin[2])
    outside = ~grid.model_mask
    for s, start in enumerate(grid.slab_starts):
        assert np.all(grid.slabs[s][:, outside[start : start + 8]] == -1.0)


def test_brain_mask_matches_the_phantom_truth(head16):
    grid = to_model_grid(head16.series)
    truth = head16.study.truth.brain_mask
    assert dice(grid.brain_mask, truth) >= 0.95
    assert np.count_nonzero(grid.brain_mask & ~truth) == 0  # eroded away from the skull, never beyond it
    assert dice(grid.model_mask, _on_model_grid(grid, truth)) >= 0.9
    assert grid.model_mask.sum() > 0.9 * _on_model_grid(grid, truth).sum()


def test_512_phantom_is_resampled_and_its_mask_matches_the_truth():
    study = generate_phantom(PhantomConfig(matrix=512, slices=8, duration_s=2, noise_hu=5.0, seed=5))
    from ctp_node.series import CTPSeries

    series = CTPSeries(study.hu, study.times_s, study.origin_mm, study.spacing_mm)
    grid = to_model_grid(series)
    assert grid.slabs[0].shape == (2, 8, 192, 192)
    assert dice(grid.brain_mask, study.truth.brain_mask) >= 0.95
    assert dice(grid.model_mask, _on_model_grid(grid, study.truth.brain_mask)) >= 0.9


def test_window_is_clipped_and_outside_the_brain_is_minus_one():
    series = ring_head()
    grid = to_model_grid(series)
    slab = grid.slabs[0]
    # model grid: 1.25 mm pixels centred on the head, so model pixel (row, col) sits at
    # (-(191/2) + row, -(191/2) + col) * 1.25 mm; the vessel block is at x = +30 mm, the dark block at -30 mm
    centre = 95.5

    def at(x_mm: float, y_mm: float) -> np.ndarray:
        return slab[:, 4, int(round(centre + y_mm / 1.25)), int(round(centre + x_mm / 1.25))]

    np.testing.assert_array_equal(at(30, 0), [1.0, 1.0])  # 150 HU clipped to 80
    np.testing.assert_array_equal(at(-30, 0), [-1.0, -1.0])  # -20 HU clipped to 0
    np.testing.assert_allclose(at(0, 40), to_model_space(np.array([BRAIN_HU, BRAIN_HU + 8.0])), atol=1e-6)
    np.testing.assert_array_equal(at(0, 73), [-1.0, -1.0])  # skull: outside the brain
    np.testing.assert_array_equal(at(0, 78), [-1.0, -1.0])  # scalp


def test_anisotropic_pixels_become_square_and_keep_the_head_round():
    series = ring_head(shape_zyx=(8, 400, 250), spacing_zyx=(5.0, 0.5, 0.8))  # 200 x 200 mm
    grid = to_model_grid(series)
    assert grid.model.spacing[:2] == (1.25, 1.25)
    rows, cols = np.nonzero(grid.model_mask[4])
    height_mm = (rows.max() - rows.min() + 1) * 1.25
    width_mm = (cols.max() - cols.min() + 1) * 1.25
    expected = 2 * (70.0 - 2.0)  # brain diameter minus the 2 mm erosion on each side
    assert height_mm == pytest.approx(expected, abs=2.6) and width_mm == pytest.approx(expected, abs=2.6)


def test_model_grid_is_centred_on_the_brain():
    series = ring_head(shape_zyx=(8, 200, 200), centre_mm=(20.0, -15.0))
    grid = to_model_grid(series)
    centre = np.asarray(grid.model.origin[:2]) + 95.5 * 1.25
    np.testing.assert_allclose(centre, [20.0, -15.0], atol=1.25)


def test_oblique_direction_is_carried_to_the_model_grid_and_back():
    series = ring_head(times_s=(0.0, 2.0))
    angle = np.radians(20.0)  # rows and columns rotated in the axial plane; slices stacked downwards
    series.direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    grid = to_model_grid(series)
    np.testing.assert_allclose(np.reshape(grid.model.direction, (3, 3)), series.direction)
    brain_centre = np.asarray(series.origin) + series.direction @ np.array([79.5 * 1.25, 79.5 * 1.25, 0.0])
    model_centre = np.asarray(grid.model.origin) + series.direction @ np.array([95.5 * 1.25, 95.5 * 1.25, 0.0])
    np.testing.assert_allclose(model_centre, brain_centre, atol=1.25)
    out = from_model_grid(grid, _constant_slabs(grid, 3, 0.25), np.array([False, True, False]), series, np.arange(3.0))
    brain = grid.brain_mask & (series.hu[0] == BRAIN_HU)
    np.testing.assert_allclose(out[1][brain], 50.0, atol=1e-3)


def test_scan_field_of_view_option_uses_the_longer_side():
    series = ring_head(shape_zyx=(8, 240, 200), spacing_zyx=(5.0, 1.0, 1.0))
    grid = to_model_grid(series, fov_mm=None)
    assert grid.model.spacing[0] == pytest.approx(240 / 192)
    centre = np.asarray(grid.model.origin[:2]) + 95.5 * grid.model.spacing[0]
    np.testing.assert_allclose(centre, [0.0, 0.0], atol=1e-9)


@pytest.mark.parametrize(
    ("slices", "starts", "from_slab"),
    [
        (8, (0,), [0] * 8),
        (12, (0, 4), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]),
        (5, (0,), [0] * 5),
    ],
)
def test_slab_layout(slices, starts, from_slab):
    grid = to_model_grid(ring_head(shape_zyx=(slices, 160, 160)))
    assert grid.slab_starts == starts
    assert grid.slab_of_slice.tolist() == from_slab
    if slices < 8:
        assert np.all(grid.slabs[0][:, slices:] == -1.0)  # padding: outside the brain


def test_thin_slices_are_resampled_to_five_mm_and_back():
    series = ring_head(shape_zyx=(32, 160, 160), spacing_zyx=(1.25, 1.25, 1.25))  # 40 mm coverage
    grid = to_model_grid(series)
    assert not grid.native_z
    assert grid.model.size[2] == 8 and grid.model.spacing[2] == pytest.approx(5.0)
    assert grid.model.origin[2] == pytest.approx(-0.625 + 2.5)  # model slices span the same outer faces
    synthetic = np.array([False, True, True, True, False])
    out = from_model_grid(grid, _constant_slabs(grid, 5, 0.0), synthetic, series, np.arange(5.0))
    inside = grid.brain_mask & (series.hu[0] == BRAIN_HU)
    np.testing.assert_allclose(out[2][inside], 40.0, atol=1e-3)
    np.testing.assert_array_equal(out[4], series.hu[1])


def test_no_skull_means_no_brain():
    series = ring_head()
    series.hu[:] = 30.0  # a water phantom: nothing enclosed by bone
    with pytest.raises(GridError, match="no intracranial region"):
        to_model_grid(series)
    assert issubclass(GridError, CTPInputError)


def test_a_gap_in_the_skull_ring_is_sealed():
    series = ring_head()
    intact = to_model_grid(series).brain_mask
    # an 8 mm wide channel of soft tissue through the skull at the back of the head (+y), as a foramen
    y = series.origin[1] + np.arange(160) * 1.25
    x = series.origin[0] + np.arange(160) * 1.25
    channel = (np.abs(x)[None, :] < 4) & (y[:, None] > 60)
    series.hu[:, :, channel & (series.hu[0, 0] == 1000.0)] = 40.0
    holed = to_model_grid(series).brain_mask
    assert dice(holed, intact) > 0.98


def test_non_finite_hu_are_refused():
    series = ring_head()
    series.hu[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_model_grid(series)


def test_a_brain_wider_than_the_model_field_of_view_is_refused():
    with pytest.raises(GridError, match="field of view"):
        to_model_grid(ring_head(), fov_mm=100.0)


# -- from_model_grid -----------------------------------------------------------------------------------------


def test_to_grid_and_straight_back_returns_the_source_exactly(head16):
    series = head16.series
    grid = to_model_grid(series)
    out = from_model_grid(grid, grid.slabs, np.zeros(4, dtype=bool), series, series.times_s)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, series.hu)


def test_synthetic_seconds_take_the_model_in_the_brain_window_and_interpolation_elsewhere(head16):
    series = head16.series  # acquired at 0, 4, 8, 12 s
    grid = to_model_grid(series)
    seconds = np.arange(13.0)
    synthetic = seconds % 4 != 0
    out = from_model_grid(grid, _constant_slabs(grid, 13, 0.25), synthetic, series, seconds)  # 0.25 -> 50 HU

    for g in (0, 4, 8, 12):
        np.testing.assert_array_equal(out[g], series.hu[g // 4])  # acquired: bit for bit
    g, left, right, weight = 5, 1, 2, 0.25
    interpolated = _interpolated(series, left, right, weight)
    in_window = (series.hu[left] >= 0) & (series.hu[left] <= 80) & (series.hu[right] >= 0) & (series.hu[right] <= 80)
    model = grid.brain_mask & in_window
    rest = ~model
    assert model.sum() > 0.8 * grid.brain_mask.sum()
    assert (grid.brain_mask & ~in_window).sum() > 0  # vessels and noisy CSF: the test can tell the two apart
    np.testing.assert_allclose(out[g][model], 50.0, atol=1e-3)
    np.testing.assert_allclose(out[g][rest], interpolated[rest], atol=1e-3)
    assert out[g][~grid.brain_mask].min() < -900 and out[g][~grid.brain_mask].max() > 300  # air and bone kept


def test_model_values_reach_the_brain_edge_undarkened():
    # native pixels (0.47 mm) finer than the model's (1.25 mm): brain-edge voxels interpolate between
    # model pixels inside and outside the model's mask; only those inside may count
    series = ring_head(shape_zyx=(8, 512, 512), spacing_zyx=(5.0, 240 / 512, 240 / 512), times_s=(0.0, 2.0))
    grid = to_model_grid(series)
    out = from_model_grid(grid, _constant_slabs(grid, 3, 0.25), np.array([False, True, False]), series, np.arange(3.0))
    in_window = grid.brain_mask & (series.hu[0] >= 0) & (series.hu[0] <= 80)
    model_valued = np.isclose(out[1], 50.0, atol=1e-3)
    assert np.count_nonzero(model_valued & in_window) >= 0.999 * np.count_nonzero(in_window)
    assert not np.any(model_valued & ~grid.brain_mask)


def test_seconds_neither_acquired_nor_synthetic_are_interpolated_everywhere():
    series = ring_head(times_s=(0.0, 4.0))
    grid = to_model_grid(series)
    synthetic = np.array([False, False, True, False, False])  # 1 and 3: the engine's long-gap fallback
    out = from_model_grid(grid, _constant_slabs(grid, 5, 0.5), synthetic, series, np.arange(5.0))
    np.testing.assert_allclose(out[1], _interpolated(series, 0, 1, 0.25), atol=1e-4)
    np.testing.assert_allclose(out[3], _interpolated(series, 0, 1, 0.75), atol=1e-4)
    np.testing.assert_allclose(out[2][grid.brain_mask & (series.hu[0] == BRAIN_HU)], 60.0, atol=1e-3)


def test_unusable_volumes_are_not_copied_nor_interpolated_from():
    series = ring_head(times_s=(0.0, 2.0, 4.0))
    series.hu[1] += 500.0  # a corrupted volume
    grid = to_model_grid(dataclasses.replace(series, hu=series.hu[[0, 2]], times_s=np.array([0.0, 4.0])))
    synthetic = np.array([False, True, True, True, False])
    usable = np.array([True, False, True])
    out = from_model_grid(grid, _constant_slabs(grid, 5, 0.0), synthetic, series, np.arange(5.0), usable=usable)
    outside = ~grid.brain_mask
    np.testing.assert_allclose(out[2][outside], _interpolated(series, 0, 2, 0.5)[outside], atol=1e-4)
    np.testing.assert_array_equal(out[4], series.hu[2])


def test_snapped_acquisitions_are_copied_to_their_second():
    sources = second_sources(np.array([0.0, 3.6, 8.2]), np.arange(9.0), np.array([False] * 9))
    assert [(s.kind, s.left) for s in sources if s.kind == "acquired"] == [
        ("acquired", 0),
        ("acquired", 1),
        ("acquired", 2),
    ]
    assert sources[4].kind == "acquired" and sources[8].kind == "acquired"
    assert sources[2].kind == "interpolated" and sources[2].weight == pytest.approx(2 / 3.6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("slab_count", "inpainted slabs"),
        ("slab_shape", "expected"),
        ("synthetic_length", "synthetic must be a bool array of length 5"),
        ("synthetic_dtype", "synthetic must be a bool array"),
        ("beyond_last", "not extrapolated"),
        ("other_source", "pass the series given to to_model_grid"),
    ],
)
def test_from_model_grid_refuses_inconsistent_inputs(change, message):
    series = ring_head()
    grid = to_model_grid(series)
    slabs = _constant_slabs(grid, 5, 0.0)
    synthetic = np.array([False, True, True, True, False])
    times = np.arange(5.0)
    source = series
    if change == "slab_count":
        slabs = slabs + slabs
    elif change == "slab_shape":
        slabs = [s[:, :4] for s in slabs]
    elif change == "synthetic_length":
        synthetic = synthetic[:4]
    elif change == "synthetic_dtype":
        synthetic = synthetic.astype(np.uint8)
    elif change == "beyond_last":
        slabs = _constant_slabs(grid, 6, 0.0)
        synthetic, times = np.array([False, True, True, True, False, True]), np.arange(6.0)
    elif change == "other_source":
        source = ring_head(shape_zyx=(8, 150, 160))
    with pytest.raises(ValueError, match=message):
        from_model_grid(grid, slabs, synthetic, source, times)
