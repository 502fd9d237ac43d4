"""Per-map validity masks (issue 21 item 5): truncated outflow, 3 s sampling, 10 HU noise, flat curves.

Small family-A phantoms (128 x 128 x 6) with a patch of parenchyma that does not enhance at all (its
unenhanced HU plus noise in every frame) in the hemisphere opposite the lesion. Each robustness case
must finish, flag what it could not measure and never put core where the curve is flat, while the
real core (low but nonzero flow) is still found. Each test also runs with the masks switched off and
checks the failure it guards against is there, so it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.perfusion import PerfusionSettings, compute_perfusion, validity
from ctp_node.perfusion.export import write_npz
from ctp_node.phantom import PhantomConfig, TissueLabel, generate_phantom

SLOW_DELAYED = (TissueLabel.WM_PENUMBRA, TissueLabel.GM_CORE, TissueLabel.WM_CORE)


def _study(noise_hu: float):
    study = generate_phantom(PhantomConfig(matrix=128, slices=6, noise_hu=noise_hu, seed=10))
    hu = study.hu.copy()
    z, y, x = np.indices(hu.shape[1:])
    pixel = study.spacing_mm[2]
    cy, cx = hu.shape[2] / 2 - 5.0 / pixel, hu.shape[3] / 2 - 40.0 / pixel  # mirror of the lesion (+40 mm)
    flat = (np.hypot(y - cy, x - cx) * pixel < 10.0) & study.truth.parenchyma_mask & (z >= 1) & (z < 5)
    rng = np.random.default_rng(5)
    unenhanced = study.hu[:3].mean(axis=0)[flat]
    hu[:, flat] = unenhanced[None] + noise_hu * rng.standard_normal((hu.shape[0], int(flat.sum())))
    return study, hu.astype(np.float32), flat


@pytest.fixture(scope="module")
def noisy():
    return _study(6.0)


@pytest.fixture(scope="module")
def very_noisy():
    return _study(10.0)


def _analyse(study, hu, frames=slice(None), masks: bool = True):
    settings = PerfusionSettings(pixel_mm=float(study.spacing_mm[2]), validity_masks=masks)
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    return compute_perfusion(hu[frames], study.times_s[frames], voxel_ml, settings=settings)


CASES = {
    "1 s, 61 s": slice(None),
    "truncated at 45 s": slice(0, 46),
    "every 3 s": slice(None, None, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flat_curve_is_never_core_and_the_core_is_still_found(noisy, case):
    study, hu, flat = noisy
    maps = _analyse(study, hu, CASES[case])
    truth_core = study.truth.core_mask & maps.tissue_mask
    assert not (maps.core_mask & flat).any()
    # Flagged: most of the patch has no valid value of any map (its rim joins the tissue around it).
    for name, valid in maps.valid_masks.items():
        assert (flat & maps.tissue_mask & ~valid).sum() >= 0.5 * (flat & maps.tissue_mask).sum(), name
    # The real core (CBF 2.5-5 against 25-53) enhances measurably as a region: found and valid.
    assert (maps.core_mask & truth_core).sum() >= 0.7 * truth_core.sum()
    assert maps.valid_masks["cbf"][truth_core].mean() >= 0.9
    assert maps.volume_checks["core"].invalid_ml > 1.0  # the patch's would-be core is said, not counted
    # Without the masks the flat patch reads as core: the failure the masks prevent.
    off = _analyse(study, hu, CASES[case], masks=False)
    assert off.validity is None and (off.core_mask & flat).sum() >= 0.3 * flat.sum()


def test_ten_hu_noise_finishes_flags_and_keeps_flat_out_of_the_core(very_noisy):
    study, hu, flat = very_noisy
    maps = _analyse(study, hu)
    assert not (maps.core_mask & flat).any()
    assert maps.valid_masks["cbf"][study.truth.core_mask & maps.tissue_mask].mean() >= 0.9
    assert maps.core_volume_ml is not None and maps.core_volume_ml > 10.0
    off = _analyse(study, hu, masks=False)
    assert (off.core_mask & flat).sum() >= 0.3 * flat.sum()


def test_truncated_outflow_flags_cbv_and_mtt_of_slow_delayed_tissue(noisy):
    study, hu, _ = noisy
    full, cut = _analyse(study, hu), _analyse(study, hu, slice(0, 46))
    labels = study.truth.labels
    slow = np.isin(labels, SLOW_DELAYED) & cut.tissue_mask
    grey = (labels == TissueLabel.GREY_MATTER) & cut.tissue_mask
    for name in ("cbv", "mtt"):
        assert 1.0 - cut.valid_masks[name][slow].mean() >= 0.8, name  # transit 10-14 s, delay 8-12 s
        assert 1.0 - full.valid_masks[name][grey].mean() <= 0.15, name  # 3.7 s, 1 s: complete at 61 s
        assert (~cut.valid_masks[name] & grey).sum() > (~full.valid_masks[name] & grey).sum()
    assert cut.validity.truncated[slow].mean() >= 0.8
    # CBF is not flagged for truncation: the core is a relative flow threshold (see validity).
    assert cut.valid_masks["cbf"][slow].mean() >= 0.9
    summary = cut.summary()["validity"]
    assert summary["invalid_fraction"]["cbv"] > summary["invalid_fraction"]["cbf"]
    assert any("invalid (no value the data support)" in note for note in cut.notes)


def test_missing_area_fraction_follows_indicator_dilution():
    grid = np.arange(0.0, 61.0)
    aif = np.where(grid == 10.0, 1.0, 0.0)  # a bolus at 10 s: the response is R(t - 10 - d)
    mtt = np.array([[[4.0, 12.0, 12.0]]])
    tmax = np.array([[[1.0, 8.0, 40.0]]])
    where = np.ones(mtt.shape, dtype=bool)
    missing = validity.missing_area_fraction(aif, grid, mtt, tmax, where)[0, 0]
    # exp(-(60 - 10 - d) / MTT): what an exponential residue has left after the last frame.
    np.testing.assert_allclose(missing, np.exp(-np.array([49.0 / 4.0, 42.0 / 12.0, 10.0 / 12.0])), rtol=1e-5)


def test_tmax_is_unresolved_beyond_the_window_or_the_fit_range():
    tmax = np.array([2.0, 20.0, 27.5, 14.9])
    where = np.ones(4, dtype=bool)
    acquired = np.arange(0.0, 46.0, 3.0)  # every 3 s to 45 s; the AIF peaks at 15 s
    # Tissue peaks at 17 s (frames 18..45 follow), 35 s (36..45), 42.5 s (only 45: one frame), 29.9 s.
    assert validity.tmax_unresolved(tmax, 15.0, acquired, None, where).tolist() == [False, False, True, False]
    # A fit whose delays end at 15 s (last cell from 14.75 s) cannot say more than "at least 14.75 s".
    assert validity.tmax_unresolved(tmax, 15.0, acquired, 14.75, where).tolist() == [False, True, True, True]


def test_noise_free_flat_region_is_not_enhancing():
    tissue = np.ones((1, 4, 8), dtype=bool)
    area = np.zeros(tissue.shape, dtype=np.float32)
    area[..., 4:] = 50.0  # the right half enhances, the left half is exactly flat
    low = np.zeros(tissue.shape, dtype=bool)
    low[..., :4] = True
    out = validity.enhancing_regions(area, tissue, low, sigma_hu=0.0, weight_norm=8.0, corr_area=1.0)
    assert not out[..., :4].any() and out[..., 4:].all()


def test_masks_are_written_with_the_maps(noisy, tmp_path):
    study, hu, _ = noisy
    maps = _analyse(study, hu, slice(0, 46))
    with np.load(write_npz(tmp_path / "maps.npz", maps)) as saved:
        for name in ("cbf", "cbv", "mtt", "tmax"):
            np.testing.assert_array_equal(saved[f"valid_{name}"], maps.valid_masks[name])
    record = maps.summary()
    assert set(record["validity"]["invalid_fraction"]) == {"cbf", "cbv", "mtt", "tmax"}
    assert record["volume_checks"]["core"]["invalid_ml"] > 0
