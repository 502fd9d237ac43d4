"""Evaluation metrics on hand-made volumes with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctp_node.evaluation.metrics import (
    ReferenceMaps,
    dice,
    image_metrics,
    map_error,
    mask_agreement,
    masked_psnr,
    masked_ssim,
    perfusion_agreement,
    sequence_image_metrics,
)

RNG = np.random.default_rng(0)
VOLUME = RNG.uniform(10.0, 60.0, size=(6, 24, 24))


def test_identical_volumes():
    metrics = image_metrics(VOLUME, VOLUME.copy())
    assert metrics.psnr_db == math.inf
    assert metrics.ssim == pytest.approx(1.0, abs=1e-12)
    assert metrics.mae_hu == 0.0
    assert metrics.to_dict()["psnr_db"] is None  # inf is not JSON
    json.dumps(metrics.to_dict(), allow_nan=False)


def test_constant_offset_has_the_known_psnr():
    # MSE = 5^2 = 25 inside the window: PSNR = 10 log10(80^2 / 25) = 24.082 dB
    assert masked_psnr(VOLUME + 5.0, VOLUME) == pytest.approx(10 * math.log10(6400 / 25), abs=1e-9)


def test_constant_volumes_have_the_known_ssim():
    # Flat volumes: only the luminance term remains, (2 mx my + C1) / (mx^2 + my^2 + C1), C1 = 0.8^2.
    x, y = np.full((4, 16, 16), 30.0), np.full((4, 16, 16), 35.0)
    expected = (2 * 30 * 35 + 0.64) / (30**2 + 35**2 + 0.64)
    assert masked_ssim(x, y) == pytest.approx(expected, abs=1e-9)


def test_window_clips_before_comparing():
    low, high = VOLUME.copy(), VOLUME.copy()
    low[0, 0, 0], high[0, 0, 0] = -500.0, -20.0  # both 0 after clipping to 0..80
    assert masked_psnr(low, high) == math.inf
    assert masked_ssim(low, high) == pytest.approx(1.0, abs=1e-12)


def test_voxels_outside_the_mask_do_not_count_even_inside_ssim_windows():
    mask = np.zeros(VOLUME.shape, bool)
    mask[:, 4:20, 4:20] = True
    other = VOLUME.copy()
    other[~mask] = RNG.uniform(0.0, 80.0, size=int((~mask).sum()))
    assert masked_psnr(other, VOLUME, mask) == math.inf
    assert masked_ssim(other, VOLUME, mask) == pytest.approx(1.0, abs=1e-9)
    assert masked_ssim(other, VOLUME) < 0.9


def test_ssim_falls_with_noise_and_is_symmetric():
    noisy = [VOLUME + s * RNG.standard_normal(VOLUME.shape) for s in (1.0, 4.0, 16.0)]
    values = [masked_ssim(n, VOLUME) for n in noisy]
    assert values[0] > values[1] > values[2]
    assert masked_ssim(VOLUME, noisy[1]) == pytest.approx(values[1], abs=1e-12)


def test_sequence_metrics_pool_the_selected_frames():
    truth = np.stack([VOLUME] * 4)
    candidate = truth.copy()
    candidate[1] += 4.0
    candidate[2] += 2.0
    frames = np.array([False, True, True, False])
    result = sequence_image_metrics(candidate, truth, frames=frames)
    assert result.frames == [1, 2]
    assert result.psnr_db == pytest.approx(10 * math.log10(6400 / ((16 + 4) / 2)))
    assert result.per_frame[0].psnr_db == pytest.approx(10 * math.log10(6400 / 16))
    assert result.mae_hu == pytest.approx(3.0)
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="non-empty"):
        sequence_image_metrics(candidate, truth, frames=np.zeros(4, bool))


def test_shape_and_empty_mask_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        masked_psnr(VOLUME, VOLUME[:-1])
    with pytest.raises(ValueError, match="mask is empty"):
        masked_ssim(VOLUME, VOLUME, np.zeros(VOLUME.shape, bool))


def test_dice_and_volumes_on_hand_made_masks():
    a = np.zeros((2, 5, 5), bool)
    b = np.zeros((2, 5, 5), bool)
    a[0, 0, :5] = True
    a[1, 0, :5] = True  # 10 voxels
    b[0, 0, 1:5] = True
    b[1, 1, :2] = True  # 6 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(np.zeros_like(a), np.zeros_like(b)) == 1.0
    agreement = mask_agreement(a, b, voxel_volume_ml=0.5)
    assert (agreement.candidate_volume_ml, agreement.reference_volume_ml) == (5.0, 3.0)
    assert agreement.volume_error_ml == 2.0 and agreement.abs_volume_error_ml == 2.0
    assert mask_agreement(a, b).candidate_volume_ml is None


def test_map_error_medians():
    reference = np.array([10.0, 20.0, 40.0, 0.0, 50.0])
    candidate = np.array([12.0, 15.0, 40.0, 3.0, 100.0])
    region = np.array([True, True, True, True, False])
    error = map_error(candidate, reference, region)
    assert error.median_abs_error == pytest.approx(np.median([2, 5, 0, 3]))
    assert error.median_rel_error == pytest.approx(np.median([0.2, 0.25, 0.0]))  # r = 0 skipped
    assert error.median_error == pytest.approx(np.median([2, -5, 0, 3]))
    assert error.n_voxels == 4
    empty = map_error(candidate, reference, np.zeros(5, bool))
    assert empty.n_voxels == 0 and empty.to_dict()["median_abs_error"] is None


def test_perfusion_agreement_per_map_and_region():
    shape = (1, 4, 4)
    grey = np.zeros(shape, bool)
    grey[0, :2] = True
    white = ~grey

    def maps(scale: float, core_rows: slice) -> ReferenceMaps:
        core = np.zeros(shape, bool)
        core[0, core_rows] = True
        ones = np.ones(shape)
        return ReferenceMaps(cbf=50 * scale * ones, cbv=4 * ones, mtt=5 * ones, tmax=2 * ones,
                             core_mask=core, hypoperfusion_mask=core.copy())  # fmt: skip

    result = perfusion_agreement(maps(0.8, slice(0, 2)), maps(1.0, slice(1, 3)), {"grey": grey, "white": white}, 0.1)
    assert result.maps["cbf"]["grey"].median_rel_error == pytest.approx(0.2)
    assert result.maps["cbf"]["white"].median_error == pytest.approx(-10.0)
    assert result.maps["cbv"]["grey"].median_abs_error == 0.0
    assert result.core.dice == pytest.approx(0.5) and result.core.volume_error_ml == pytest.approx(0.0)
    as_dict = result.to_dict()
    assert as_dict["maps"]["tmax"]["white"]["n_voxels"] == 8
    json.dumps(as_dict, allow_nan=False)
