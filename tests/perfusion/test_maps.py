"""compute_perfusion on a small synthetic head (skull, artery, normal half, delayed low-flow half).

The default analysis (model-based fit on TIPS-filtered curves) unless a test names another."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.evaluation.metrics import dice
from ctp_node.perfusion import DEFAULT_K, PerfusionSettings, compute_perfusion
from tests.perfusion.synthetic import synthetic_head

TIMES = np.arange(0.0, 61.0, 1.0)
K1 = PerfusionSettings(k=1.0)  # the synthetic head has no haematocrit correction built in


def _median(volume: np.ndarray, region: np.ndarray) -> float:
    return float(np.median(volume[:, region]))


@pytest.fixture(scope="module")
def head():
    return synthetic_head(TIMES)


@pytest.fixture(scope="module")
def maps(head):
    return compute_perfusion(head[0], TIMES, voxel_volume_ml=0.002, settings=K1)


def test_brain_mask_is_the_inside_of_the_skull(head, maps):
    truth = head[1]
    assert maps.brain_mask.shape == (2, 48, 48)
    assert dice(maps.brain_mask, np.broadcast_to(truth["brain"], maps.brain_mask.shape)) > 0.97


def test_aif_voxels_are_in_the_artery(head, maps):
    artery = head[1]["artery"]
    assert len(maps.aif_voxels) >= 6
    assert all(artery[y, x] for _, y, x in maps.aif_voxels)
    assert maps.aif_curve.max() == pytest.approx(400.0, rel=0.02)
    # The bolus starts at 8 s; the baseline ends 1 s before the foot extrapolated from its upslope.
    assert maps.baseline_frames.tolist() == list(range(8))


def test_maps_recover_the_classes(head, maps):
    truth = head[1]
    normal, lesion = truth["normal"], truth["lesion"]
    # CBV: the area ratio is exact up to the lesion's tail that leaves the 60 s window.
    assert _median(maps.cbv, normal) == pytest.approx(50 * 4 / 60, rel=0.02)
    assert _median(maps.cbv, lesion) == pytest.approx(8 * 10 / 60, rel=0.05)
    # CBF and Tmax: the model fit has neither the truncation bias nor the delay shift of SVD.
    assert _median(maps.cbf, normal) == pytest.approx(50.0, rel=0.1)
    assert _median(maps.cbf, lesion) == pytest.approx(8.0, rel=0.2)
    assert _median(maps.mtt, normal) == pytest.approx(_median(maps.cbv, normal) / _median(maps.cbf, normal) * 60)
    assert _median(maps.tmax, normal) == pytest.approx(1.0, abs=0.5)
    assert _median(maps.tmax, lesion) == pytest.approx(8.0, abs=1.0)
    assert _median(maps.ttp, normal) < _median(maps.ttp, lesion)
    assert np.all(maps.cbf[~maps.brain_mask] == 0)


def test_core_and_hypoperfusion_are_the_lesion(head, maps):
    lesion = np.broadcast_to(head[1]["lesion"], maps.core_mask.shape)
    assert dice(maps.hypoperfusion_mask, lesion) > 0.95
    assert dice(maps.core_mask, lesion) > 0.95  # 8 of ~35 mL/100 g/min: rCBF ~ 0.2
    assert maps.core_volume_ml == pytest.approx(maps.core_mask.sum() * 0.002)
    assert maps.hypoperfusion_intensity_ratio == pytest.approx(0.0)  # Tmax ~8 s: none above 10 s
    assert maps.reference_cbf == pytest.approx(_median(maps.cbf, head[1]["normal"]), rel=0.05)
    summary = maps.summary()
    assert summary["core_volume_ml"] == maps.core_volume_ml
    assert summary["aif_voxels_zyx"][0] == maps.aif_voxels[0].tolist()


def test_k_scales_flow_and_volume_but_not_time(head, maps):
    scaled = compute_perfusion(head[0], TIMES, settings=PerfusionSettings(k=DEFAULT_K))
    np.testing.assert_allclose(scaled.cbf, maps.cbf * DEFAULT_K, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scaled.cbv, maps.cbv * DEFAULT_K, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scaled.mtt, maps.mtt, rtol=1e-4, atol=1e-4)
    assert scaled.core_volume_ml is None  # no voxel volume given
    assert round(DEFAULT_K, 4) == 0.6984


def test_non_uniform_sampling_gives_the_same_maps(head, maps):
    rng = np.random.default_rng(3)
    times = np.concatenate([np.arange(0.0, 30.0, 1.3), np.arange(31.0, 60.0, 3.2)])
    times = times + rng.uniform(0, 0.2, times.size)
    hu, _ = synthetic_head(times)
    sparse = compute_perfusion(hu, times, settings=K1)
    assert any("linearly resampled" in note for note in sparse.notes)
    for name, region in (("normal", head[1]["normal"]), ("lesion", head[1]["lesion"])):
        assert _median(sparse.cbv, region) == pytest.approx(_median(maps.cbv, region), rel=0.05)
        assert _median(sparse.cbf, region) == pytest.approx(_median(maps.cbf, region), rel=0.12), name
        assert _median(sparse.tmax, region) == pytest.approx(_median(maps.tmax, region), abs=0.6), name


def test_osvd_and_a_given_aif_mask(head, maps):
    artery = np.broadcast_to(head[1]["artery"], maps.brain_mask.shape)
    osvd = compute_perfusion(head[0], TIMES, method="osvd", aif_mask=artery, settings=K1)
    bsvd = compute_perfusion(head[0], TIMES, method="bsvd", settings=K1)
    assert len(osvd.aif_voxels) == artery.sum()
    normal = head[1]["normal"]
    # bSVD at 0.1 underestimates the short-MTT tissue (see test_deconvolution); oSVD less so.
    assert 0.6 * 50 < _median(bsvd.cbf, normal) < _median(osvd.cbf, normal) <= 50.0
    np.testing.assert_allclose(osvd.cbv, bsvd.cbv, rtol=1e-3, atol=1e-4)  # CBV does not deconvolve


def test_noise_is_tolerated(head):
    hu, truth = synthetic_head(TIMES, noise_hu=3.0, seed=5)
    noisy = compute_perfusion(hu, TIMES, settings=K1, method="osvd")
    lesion = np.broadcast_to(truth["lesion"], noisy.core_mask.shape)
    assert _median(noisy.cbv, truth["normal"]) == pytest.approx(50 * 4 / 60, rel=0.1)
    assert dice(noisy.hypoperfusion_mask, lesion) > 0.8


def test_osvd_on_sparse_sampling_says_to_prefer_bsvd(head):
    times = np.arange(0.0, 61.0, 4.0)
    hu, _ = synthetic_head(times)
    assert not any("prefer bsvd" in note for note in compute_perfusion(hu, times, method="bsvd").notes)
    notes = compute_perfusion(hu, times, method="osvd").notes
    assert sum("prefer bsvd" in note for note in notes) == 1


def test_venous_scaling_corrects_a_partial_volume_aif():
    """Artery at 60 % partial volume, plus a venous sinus (6 s later, dispersed, full area)."""
    from tests.perfusion.synthetic import gamma_aif

    hu, truth = synthetic_head(TIMES)
    artery = truth["artery"]
    hu[:, :, artery] = 40.0 + 0.6 * gamma_aif(TIMES)[:, None, None]
    fine = np.arange(0.0, 70.0, 0.01)
    kernel = np.exp(-fine / 3.0)
    vein_fine = np.convolve(gamma_aif(fine - 6.0), kernel / kernel.sum())[: fine.size]
    vein = np.zeros(artery.shape, bool)
    vein[30:33, 12:15] = True
    hu[:, :, vein] = 40.0 + np.interp(TIMES, fine, vein_fine)[:, None, None]
    plain = compute_perfusion(hu, TIMES, settings=PerfusionSettings(k=1.0, vof_scaling=False))
    scaled = compute_perfusion(hu, TIMES, settings=K1)  # the correction is on by default
    assert all(artery[y, x] for _, y, x in plain.aif_voxels)  # the later, broader vein is not taken
    normal = truth["normal"] & ~vein
    assert _median(plain.cbv, normal) == pytest.approx(50 * 4 / 60 / 0.6, rel=0.03)
    assert scaled.vof_scale == pytest.approx(1 / 0.6, rel=0.03)
    assert _median(scaled.cbv, normal) == pytest.approx(50 * 4 / 60, rel=0.03)
