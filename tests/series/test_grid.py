"""to_model_grid / from_model_grid: skull stripping, windowing, 192 x 192 x 8 slabs, and the way back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from ctp_node.errors import CTPInputError
from ctp_node.evaluation.metrics import dice
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.sampling import acquisition_times, parse_schedule, sample_study
from ctp_node.phantom.tissue import TissueLabel
from ctp_node.series.grid import (
    FillCounts,
    GridError,
    from_model_grid,
    to_model_grid,
)
from model.planner import plan_seconds
from model.window import to_model_space
from tests.series.fill_helpers import fill_for
from tests.series.helpers import BRAIN_HU, VESSEL_HU, ring_head


def _on_model_grid(grid, mask: np.ndarray) -> np.ndarray:
    image = grid.source.image(mask.astype(np.float32))
    out = sitk.Resample(image, grid.model.image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) > 0.5


def _constant_slabs(grid, n_t1: int, value: float, volume_times=None, grid_times=None) -> list[np.ndarray]:
    """The engine's output for a model that writes ``value`` (model space) on every other second.

    Like the engine's sequence, each second that a volume of the grid's series snaps to (nearest
    whole second, ``volume_times`` against ``grid_times``; default: volume k on second k) holds the
    model's own copy of that volume (``grid.slabs``)."""
    slabs = [np.full((n_t1, 8, 192, 192), value, dtype=np.float32) for _ in grid.slabs]
    n_volumes = grid.slabs[0].shape[0]
    volume_times = np.arange(float(n_volumes)) if volume_times is None else np.asarray(volume_times, dtype=float)
    grid_times = np.arange(float(n_t1)) if grid_times is None else np.asarray(grid_times, dtype=float)
    for volume, t in enumerate(volume_times):
        g = int(np.argmin(np.abs(grid_times - t)))
        if abs(grid_times[g] - t) <= 0.5 and g < n_t1:
            for k, slab in enumerate(slabs):
                slab[g] = grid.slabs[k][volume]
    return slabs


def _corrected_slabs(grid, n_t1: int, delta_hu: float, volume_times) -> list[np.ndarray]:
    """The engine's output for a model that returns the interpolation of its neighbours (on the model
    grid) plus ``delta_hu`` on every second between two volumes (volume k on the whole second nearest
    ``volume_times[k]``)."""
    slabs = _constant_slabs(grid, n_t1, 0.0, volume_times)
    seconds = [int(round(t - volume_times[0])) for t in volume_times]
    for slab in slabs:
        for left, right in zip(seconds[:-1], seconds[1:]):
            for g in range(left + 1, right):
                w = np.float32((g - left) / (right - left))
                slab[g] = np.clip(slab[left] + w * (slab[right] - slab[left]) + np.float32(delta_hu / 40.0), -1, 1)
    return slabs


def _far_from(mask: np.ndarray, distance_px: int) -> np.ndarray:
    """Voxels at least ``distance_px`` in-plane pixels from every voxel of ``mask``."""
    from scipy import ndimage

    return ~ndimage.binary_dilation(mask, structure=np.ones((1, 2 * distance_px + 1, 2 * distance_px + 1), bool))


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
    out = from_model_grid(
        grid, _constant_slabs(grid, 3, 0.25, series.times_s), fill_for(series.times_s, [False, True, False]), series
    ).hu
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
    out = from_model_grid(
        grid, _corrected_slabs(grid, 5, -3.0, series.times_s), fill_for(series.times_s, synthetic), series
    ).hu
    inside = grid.brain_mask & _far_from(series.hu[0] != BRAIN_HU, 4)
    np.testing.assert_allclose(out[2][inside], 34.0 - 3.0, atol=1e-3)  # interpolation (34 HU) + the correction
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


def test_to_model_grid_and_straight_back_returns_the_source_exactly(head16):
    series = head16.series
    grid = to_model_grid(series)
    every_second = dataclasses.replace(series, times_s=np.arange(4.0))  # each volume its own second
    out = from_model_grid(grid, grid.slabs, fill_for(every_second.times_s), every_second).hu
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, series.hu)


def test_synthetic_seconds_take_the_model_in_the_brain_window_and_interpolation_elsewhere(head16):
    series = head16.series  # acquired at 0, 4, 8, 12 s
    grid = to_model_grid(series)
    seconds = np.arange(13.0)
    synthetic = seconds % 4 != 0
    out = from_model_grid(
        grid, _corrected_slabs(grid, 13, -3.0, series.times_s), fill_for(series.times_s, synthetic), series
    ).hu

    for g in (0, 4, 8, 12):
        np.testing.assert_array_equal(out[g], series.hu[g // 4])  # acquired: bit for bit
    g, left, right, weight = 5, 1, 2, 0.25
    interpolated = _interpolated(series, left, right, weight)
    in_window = (series.hu[left] >= 0) & (series.hu[left] <= 80) & (series.hu[right] >= 0) & (series.hu[right] <= 80)
    model = grid.brain_mask & in_window
    rest = ~model
    assert model.sum() > 0.8 * grid.brain_mask.sum()
    assert (grid.brain_mask & ~in_window).sum() > 0  # vessels and noisy CSF: the test can tell the two apart
    # the model's correction (-3 HU) on the interpolation in the window, exactly where no model pixel
    # nearby was clipped at the window's edge; never more than the correction
    exact = model & _far_from(~in_window, 4)
    assert exact.sum() > 0.7 * model.sum()
    np.testing.assert_allclose(out[g][exact], interpolated[exact] - 3.0, atol=1e-3)
    assert np.all(out[g][model] <= interpolated[model] + 1e-3) and np.all(out[g][model] >= interpolated[model] - 3.001)
    np.testing.assert_allclose(out[g][rest], interpolated[rest], atol=1e-3)
    assert out[g][~grid.brain_mask].min() < -900 and out[g][~grid.brain_mask].max() > 300  # air and bone kept


def test_model_values_reach_the_brain_edge_undarkened():
    # native pixels (0.47 mm) finer than the model's (1.25 mm): brain-edge voxels interpolate between
    # model pixels inside and outside the model's mask; only those inside may count
    series = ring_head(shape_zyx=(8, 512, 512), spacing_zyx=(5.0, 240 / 512, 240 / 512), times_s=(0.0, 2.0))
    grid = to_model_grid(series)
    out = from_model_grid(
        grid, _corrected_slabs(grid, 3, -3.0, series.times_s), fill_for(series.times_s, [False, True, False]), series
    ).hu
    brain = series.hu[0] == BRAIN_HU
    interpolated = _interpolated(series, 0, 1, 0.5)
    corrected = np.isclose(out[1], interpolated - 3.0, atol=1e-3)
    edge = grid.brain_mask & brain & _far_from(~brain & grid.brain_mask, 4)  # reaches the skull side in full
    assert np.count_nonzero(corrected & edge) >= 0.999 * np.count_nonzero(edge)
    assert not np.any(corrected & ~grid.brain_mask)


def test_a_model_that_returns_interpolation_gives_interpolation_exactly(head16):
    """No offset from the trip to the model grid and back: only the model's correction is resampled."""
    series = head16.series  # acquired at 0, 4, 8, 12 s
    grid = to_model_grid(series)
    seconds = np.arange(13.0)
    plan = fill_for(series.times_s, seconds % 4 != 0)
    out = from_model_grid(grid, _corrected_slabs(grid, 13, 0.0, series.times_s), plan, series).hu
    for g in (1, 2, 3, 5, 10):
        left, weight = g // 4, (g % 4) / 4
        np.testing.assert_allclose(out[g], _interpolated(series, left, left + 1, weight), atol=1e-3)


def test_seconds_neither_acquired_nor_synthetic_are_interpolated_everywhere():
    series = ring_head(times_s=(0.0, 4.0))
    grid = to_model_grid(series)
    synthetic = np.array([False, False, True, False, False])  # 1 and 3: the engine's long-gap fallback
    out = from_model_grid(
        grid, _constant_slabs(grid, 5, 0.5, series.times_s), fill_for(series.times_s, synthetic), series
    ).hu
    np.testing.assert_allclose(out[1], _interpolated(series, 0, 1, 0.25), atol=1e-4)
    np.testing.assert_allclose(out[3], _interpolated(series, 0, 1, 0.75), atol=1e-4)
    np.testing.assert_allclose(out[2][grid.brain_mask & (series.hu[0] == BRAIN_HU)], 60.0, atol=1e-3)


def test_unusable_volumes_are_not_copied_nor_interpolated_from():
    series = ring_head(times_s=(0.0, 2.0, 4.0))
    series.hu[1] += 500.0  # a corrupted volume
    grid = to_model_grid(dataclasses.replace(series, hu=series.hu[[0, 2]], times_s=np.array([0.0, 4.0])))
    synthetic = np.array([False, True, True, True, False])
    usable = np.array([True, False, True])
    slabs = _constant_slabs(grid, 5, 0.0, [0.0, 4.0])
    out = from_model_grid(grid, slabs, fill_for(series.times_s, synthetic, usable), series).hu
    outside = ~grid.brain_mask
    np.testing.assert_allclose(out[2][outside], _interpolated(series, 0, 2, 0.5)[outside], atol=1e-4)
    np.testing.assert_array_equal(out[4], series.hu[2])


def test_snapped_acquisitions_are_copied_to_their_second():
    sources = fill_for(np.array([0.0, 3.6, 8.2]), [False] * 9).fills
    assert [(s.kind, s.left) for s in sources if s.kind == "acquired"] == [
        ("acquired", 0),
        ("acquired", 1),
        ("acquired", 2),
    ]
    assert sources[4].kind == "acquired" and sources[8].kind == "acquired"
    assert [s.time_s for s in sources if s.kind == "acquired"] == [0.0, 3.6, 8.2]  # their own times, not 4 and 8
    # second 2 lies half way between the snapped seconds 0 and 4: the volumes' state at 1.8 s, not 2 s
    assert sources[2].kind == "interpolated" and sources[2].weight == pytest.approx(0.5)
    assert sources[2].time_s == pytest.approx(1.8)
    assert sources[6].weight == pytest.approx(0.5) and sources[6].time_s == pytest.approx(5.9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("slab_count", "inpainted slabs"),
        ("slab_shape", "expected"),
        ("other_plan", "the plan was made for 3 volumes"),
        ("other_source", "pass the series given to to_model_grid"),
    ],
)
def test_from_model_grid_refuses_inconsistent_inputs(change, message):
    series = ring_head()
    grid = to_model_grid(series)
    slabs = _constant_slabs(grid, 5, 0.0)
    plan = fill_for(series.times_s)
    source = series
    if change == "slab_count":
        slabs = slabs + slabs
    elif change == "slab_shape":
        slabs = [s[:, :4] for s in slabs]
    elif change == "other_plan":
        plan = fill_for(np.array([0.0, 2.0, 4.0]))
    elif change == "other_source":
        source = ring_head(shape_zyx=(8, 150, 160))
    with pytest.raises(ValueError, match=message):
        from_model_grid(grid, slabs, plan, source)


# -- honest times: irregular sampling -----------------------------------------------------------------------


def _engine_plan(times_s: np.ndarray, usable: np.ndarray | None = None):
    """The plan the engine would return for these acquisition times."""
    return plan_seconds(times_s, usable=usable, long_gap="linear")


@pytest.mark.parametrize("spec", ["irregular:1.5@20,3", "irregular:2@20,4", "times:0,1.4,3.9,4.6,9.7,12.2,17"])
def test_every_image_shows_its_true_time_and_times_increase_strictly(spec):
    times = acquisition_times(parse_schedule(spec), 40.0)
    sources = _engine_plan(times).fills
    shown = np.array([s.time_s for s in sources])
    assert np.all(np.diff(shown) > 0)  # strictly increasing, no duplicates
    acquired = [s for s in sources if s.kind == "acquired"]
    assert [s.time_s for s in acquired] == [times[s.left] for s in acquired]
    assert sorted(s.left for s in acquired) == list(range(times.size))  # every volume, at its own time
    for s in sources:
        if s.kind != "acquired":
            t_left, t_right = times[s.left], times[s.right]
            assert t_left < s.time_s < t_right
            assert s.time_s == pytest.approx(t_left + s.weight * (t_right - t_left))


def test_irregular_images_interpolate_in_true_time():
    times = (0.0, 1.5, 3.0, 4.5, 6.0)  # snapped to seconds 0, 2, 3, 5, 6 by the planner
    series = ring_head(times_s=times)
    block = series.hu[0] == VESSEL_HU  # outside the window: filled from the volumes, not the model
    for k, t in enumerate(times):
        series.hu[k][block] += np.float32(5.0 * t)  # 5 HU/s: linear in time, under the vessel-fit threshold
    grid = to_model_grid(series)
    plan = _engine_plan(series.times_s)
    assert plan.synthetic.tolist() == [False, True, False, False, True, False, False]
    result = from_model_grid(grid, _constant_slabs(grid, 7, 0.25, series.times_s, plan.times_s), plan, series)
    np.testing.assert_allclose(result.times_s, [0.0, 0.75, 1.5, 3.0, 3.75, 4.5, 6.0])
    for g, t in enumerate(result.times_s):
        np.testing.assert_allclose(result.hu[g][block], VESSEL_HU + 5.0 * t, atol=1e-3)  # shows its time
    np.testing.assert_array_equal(result.hu[2], series.hu[1])  # second 2 is the volume acquired at 1.5 s
    assert result.fill.fills[2].voxels == FillCounts(acquired=series.hu[0].size)
    fill = result.fill.fills[1].voxels
    assert fill.model > 0 and fill.vessel_fit == 0 and fill.model + fill.linear == series.hu[0].size


# -- vessels: fitted, not linear ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vessel_case():
    """A 41 s phantom study acquired every 4 s from 2 s into it (the bolus peak falls between samples)."""
    cfg = PhantomConfig(matrix=128, slices=8, duration_s=43, noise_hu=5.0, seed=7)
    study = generate_phantom(cfg)
    series = sample_study(study, parse_schedule("times:" + ",".join(str(t) for t in range(2, 43, 4))))
    grid = to_model_grid(series)
    plan = _engine_plan(series.times_s)
    grid_times = plan.times_s
    slabs = _constant_slabs(grid, grid_times.size, 0.0, series.times_s, grid_times)
    arteries = (study.truth.labels == TissueLabel.ARTERY) & (series.hu.max(axis=0) > 200)
    return study, series, grid, grid_times, plan, slabs, arteries


def test_arterial_peak_is_fitted_and_acquired_seconds_stay_acquired(vessel_case):
    study, series, grid, grid_times, plan, slabs, arteries = vessel_case
    fitted = from_model_grid(grid, slabs, plan, series)
    linear = from_model_grid(grid, slabs, plan, series, fit_vessels=False)
    for g, src in enumerate(fitted.fill.fills):
        if src.kind == "acquired":
            np.testing.assert_array_equal(fitted.hu[g], series.hu[src.left])  # bit for bit
    truth = study.hu[2 + grid_times.astype(int)][:, arteries].mean(axis=1)  # the 1 s series at the same seconds
    errors = {}
    for name, result in (("fit", fitted), ("linear", linear)):
        curve = result.hu[:, arteries].mean(axis=1)
        errors[name] = (abs(curve.max() - truth.max()), abs(int(np.argmax(curve)) - int(np.argmax(truth))))
    assert errors["linear"][0] > 20.0  # the case can tell the two apart
    assert errors["fit"][0] < errors["linear"][0] / 2
    assert errors["fit"][1] <= errors["linear"][1]
    synthetic_fills = [s.voxels for s in fitted.fill.fills if s.kind == "synthetic"]
    # arteries and veins are fitted where they leave the model's window (not before the bolus, when it takes them)
    assert max(f.vessel_fit for f in synthetic_fills) >= arteries.sum() > min(f.vessel_fit for f in synthetic_fills)
    assert all(f.model + f.vessel_fit + f.linear == series.hu[0].size for f in synthetic_fills)
    assert "vessel fit" in synthetic_fills[0].describe()
    assert all(s.voxels.vessel_fit == 0 for s in linear.fill.fills if s.kind != "acquired")


def test_voxels_without_contrast_or_a_credible_fit_stay_linear(vessel_case):
    _, series, grid, grid_times, plan, slabs, _ = vessel_case
    series = dataclasses.replace(series, hu=series.hu.copy())
    static = series.hu[0] < -500  # air: no contrast, stays linear
    chaos = np.zeros(series.hu.shape[1:], dtype=bool)
    chaos[0, :4, :4] = True  # a corner of air given a zig-zag of +-150 HU: rises, but no bolus
    series.hu[:, chaos] = np.where(np.arange(series.hu.shape[0]) % 2 == 0, -850.0, -1000.0)[:, None]
    result = from_model_grid(grid, slabs, plan, series)
    for g, src in enumerate(result.fill.fills):
        if src.kind == "acquired":
            continue
        interpolated = _interpolated(series, src.left, src.right, src.weight)
        np.testing.assert_allclose(result.hu[g][static | chaos], interpolated[static | chaos], atol=1e-3)
