"""The default analysis under realistic noise, on the independent phantom family B, and its parts.

The accuracy table over many studies is benchmarks/perfusion_accuracy.py (docs/benchmarks.md); here
one small study per check, so that a regression fails a test.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.errors import NoAIFError
from ctp_node.evaluation.perfusion_accuracy import accuracy
from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.perfusion import denoise as dn
from ctp_node.perfusion.compare import median_disagreement
from ctp_node.perfusion.lesion import convention_masks, drop_small_clusters, lesion_masks, reference_region
from ctp_node.phantom import FamilyBConfig, TissueLabel, generate_family_b
from ctp_node.phantom.family_b import K_HAEMATOCRIT_DENSITY, truth_volumes


@pytest.fixture(scope="module")
def clean_b():
    return generate_family_b(FamilyBConfig(seed=11, noise_hu=0.0, slices=4))


@pytest.fixture(scope="module")
def noisy_b():
    return generate_family_b(FamilyBConfig(seed=11, noise_hu=6.0, slices=4))


def _voxel_ml(study) -> float:
    return float(np.prod(study.spacing_mm)) / 1000.0


def test_family_b_truth_is_self_consistent(clean_b):
    truth = clean_b.truth
    tissue = truth.parenchyma_mask
    assert tissue.sum() > 10_000 and truth.core_mask.any() and truth.penumbra_mask.any()
    np.testing.assert_allclose(truth.cbv[tissue], truth.cbf[tissue] * truth.mtt[tissue] / 60.0, rtol=1e-5)
    np.testing.assert_array_equal(truth.tmax, truth.delay)
    for name in ("cbf", "cbv", "mtt"):
        assert np.all(getattr(truth, name)[~tissue] == 0) and np.all(getattr(truth, name)[tissue] > 0)
    # The rendered curves obey indicator dilution: k * 100 * area(tissue) / area(AIF) = CBV for
    # normal tissue, whose curve is (nearly) complete within the 60 s.
    baseline = clean_b.hu[:4].mean(axis=0)
    area = (clean_b.hu - baseline).sum(axis=0)
    normal = np.isin(truth.labels, (TissueLabel.GREY_MATTER, TissueLabel.WHITE_MATTER))
    cbv_from_curves = K_HAEMATOCRIT_DENSITY * 100.0 * area[normal] / clean_b.aif_hu.sum()
    assert np.median(cbv_from_curves / truth.cbv[normal]) == pytest.approx(1.0, abs=0.06)
    # The lesion is what its labels say: low flow in the core, delayed penumbra.
    normal_cbf = float(np.median(truth.cbf[normal]))
    assert np.median(truth.cbf[truth.core_mask]) < 0.3 * normal_cbf
    assert np.median(truth.tmax[truth.penumbra_mask]) > np.median(truth.tmax[normal]) + 2.0
    volumes = truth_volumes(clean_b)
    assert volumes["core_ml"] == pytest.approx(
        convention_masks(truth.cbf, truth.tmax, tissue, _voxel_ml(clean_b)).core.sum() * _voxel_ml(clean_b)
    )
    assert volumes["core_ml"] > 1.0


def test_family_b_is_deterministic_and_seeds_differ():
    a = generate_family_b(FamilyBConfig(seed=3, slices=2, duration_s=30))
    b = generate_family_b(FamilyBConfig(seed=3, slices=2, duration_s=30))
    c = generate_family_b(FamilyBConfig(seed=4, slices=2, duration_s=30))
    np.testing.assert_array_equal(a.hu, b.hu)
    assert not np.array_equal(a.truth.labels, c.truth.labels) or not np.array_equal(a.aif_hu, c.aif_hu)


def test_family_b_noise_level_and_bad_configurations(noisy_b):
    head = noisy_b.truth.brain_mask
    frame_noise = (noisy_b.hu[1] - noisy_b.hu[0])[head] / np.sqrt(2.0)
    assert float(frame_noise.std()) == pytest.approx(6.0, rel=0.15)  # 6 HU, a little more centrally
    with pytest.raises(ValueError, match="field of view"):
        FamilyBConfig(matrix=128, pixel_mm=0.9)
    with pytest.raises(ValueError, match="side_override"):
        FamilyBConfig(side_override=0)


def test_default_analysis_meets_the_targets_on_a_noisy_held_out_study(noisy_b):
    voxel_ml = _voxel_ml(noisy_b)
    truth = noisy_b.truth
    maps = compute_perfusion(noisy_b.hu, noisy_b.times_s, voxel_ml, settings=PerfusionSettings(pixel_mm=0.9))
    result = accuracy(maps, noisy_b, convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml))
    print({k: round(v, 3) for k, v in result.items()})
    assert maps.method == "parametric" and maps.noise_hu == pytest.approx(6.0, rel=0.2)
    assert abs(result["core_ml"] - result["core_true_ml"]) < 10.0
    assert abs(result["tmax6_ml"] - result["tmax6_true_ml"]) < 10.0
    assert result["tmax_normal_s"] < 1.0
    for name in ("cbf_wm_rel", "cbv_wm_rel", "cbv_core_rel"):
        assert abs(result[name]) < 0.2, name
    assert abs(result["cbf_core_rel"]) < 0.35  # the target is 20 %: not met everywhere (docs/benchmarks.md)


def test_without_noise_handling_the_same_study_fails(noisy_b):
    """What the issue saw: unfiltered bSVD on 6 HU noise misses the core and floods Tmax > 6 s."""
    voxel_ml = _voxel_ml(noisy_b)
    truth = noisy_b.truth
    plain = compute_perfusion(noisy_b.hu, noisy_b.times_s, voxel_ml, "bsvd", settings=PerfusionSettings(denoise="none"))
    result = accuracy(plain, noisy_b, convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml))
    assert abs(result["tmax6_ml"] - result["tmax6_true_ml"]) > 30.0


def test_no_plausible_aif_is_a_clear_error(noisy_b):
    baseline = noisy_b.hu[:4].mean(axis=0)
    faint = (baseline + 0.05 * (noisy_b.hu - baseline)).astype(np.float32)  # arteries peak at ~25 HU
    with pytest.raises(NoAIFError, match="no arterial input function"):
        compute_perfusion(faint, noisy_b.times_s)
    with pytest.raises(ValueError, match="unknown noise handling"):
        compute_perfusion(noisy_b.hu, noisy_b.times_s, settings=PerfusionSettings(denoise="median"))  # type: ignore[arg-type]


def test_noise_estimate_and_edge_preserving_filter():
    rng = np.random.default_rng(0)
    shape = (2, 64, 64)
    frames = rng.normal(30.0, 5.0, (4, *shape)).astype(np.float32)
    mask = np.ones(shape, bool)
    noise = dn.estimate_noise(frames, np.arange(4), mask)
    assert noise.sigma_hu == pytest.approx(5.0, rel=0.05)
    # Two regions whose curves (coefficients) differ by far more than the noise: the filter must
    # average within each region and not across the edge.
    left = np.zeros(shape, bool)
    left[:, :, :32] = True
    signal = np.where(left, 20.0, 0.0)[None].repeat(3, axis=0).astype(np.float32)
    noisy = signal + rng.normal(0.0, 5.0, signal.shape).astype(np.float32)
    out = dn.tips_filter(noisy, mask, noise, pixel_mm=1.0)
    interior = np.zeros(shape, bool)
    interior[:, 8:-8, 4:28] = True
    assert np.std(out[:, interior] - signal[:, interior]) < np.std(noisy[:, interior] - signal[:, interior]) / 3
    edge_column = out[:, :, 8:-8, 31]
    assert np.mean(edge_column) == pytest.approx(20.0, abs=2.0)  # a plain Gaussian would give ~12-14
    silent = dn.NoiseEstimate(sigma_hu=0.0, noise_image=np.zeros(shape, np.float32))
    assert dn.tips_filter(noisy, mask, silent, 1.0) is noisy  # no noise measured: nothing to do


def test_model_basis_spans_the_tissue_curves():
    times = np.arange(60.0)
    aif = 400 * np.clip((times - 8) / 4, 0, None) ** 3 * np.exp(-np.clip(times - 8, 0, None) / 1.3) / 50
    basis = dn.model_basis(times, aif)
    np.testing.assert_allclose(basis @ basis.T, np.eye(basis.shape[0]), atol=1e-8)
    assert 3 <= basis.shape[0] <= dn.MAX_COMPONENTS


def test_median_disagreement(clean_b):
    truth = clean_b.truth
    region = truth.parenchyma_mask
    assert median_disagreement(truth, truth, region) == {"cbf": 0.0, "cbv": 0.0, "mtt": 0.0, "tmax": 0.0}

    class Shifted:
        cbf, cbv, mtt, tmax = truth.cbf * 1.1, truth.cbv * 0.8, truth.mtt, truth.tmax + 0.5

    result = median_disagreement(Shifted, truth, region)
    assert result["cbf"] == pytest.approx(0.1, rel=1e-3) and result["cbv"] == pytest.approx(0.2, rel=1e-3)
    assert result["mtt"] == 0.0 and result["tmax"] == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        median_disagreement(Shifted, truth, region[0])


def test_reference_is_normal_tissue_of_the_other_hemisphere_and_small_clusters_go():
    tissue = np.ones((1, 20, 40), bool)
    tmax = np.full(tissue.shape, 1.0)
    cbf = np.full(tissue.shape, 50.0)
    tmax[:, :, 25:] = 9.0  # right half delayed
    cbf[:, :, 30:] = 5.0  # and its outer part a core
    cbf[:, :, :10] = 30.0  # the left is the reference: the median of 30s and 50s
    cbf[0, 5, 5] = 1.0  # one noisy low-flow voxel in normal tissue
    hypo = tmax > 6
    region = reference_region(tissue, tmax, hypo, 2.0)
    assert not region[:, :, 20:].any() and region[:, :, :20].all()
    masks = lesion_masks(tissue, cbf, tmax, majority_size=1, voxel_volume_ml=0.1, min_cluster_ml=1.0)
    assert masks.reference_cbf == pytest.approx(40.0)
    assert not masks.core[0, 5, 5] and masks.core[:, :, 30:].all() and masks.core.sum() == 200
    island = np.zeros((3, 10, 10), bool)
    island[1, 1, 1] = True
    island[:, 5:8, 5:8] = True
    kept = drop_small_clusters(island, 5)
    assert not kept[1, 1, 1] and kept[:, 5:8, 5:8].all()


def test_the_mtt_median_narrows_the_transit_time_scatter_without_moving_it(noisy_b):
    """The fitted MTT scatters with heavy tails under noise (shape, delay and transit time trade off);
    the default in-plane median narrows that scatter in white matter and in the core and leaves the
    per-voxel median where it was."""
    truth = noisy_b.truth
    off = compute_perfusion(noisy_b.hu, noisy_b.times_s, settings=PerfusionSettings(pixel_mm=0.9, mtt_median_mm=0.0))
    on = compute_perfusion(noisy_b.hu, noisy_b.times_s, settings=PerfusionSettings(pixel_mm=0.9))
    for region in (truth.labels == TissueLabel.WHITE_MATTER, truth.core_mask):
        use = region & (truth.mtt > 0) & (off.mtt > 0) & (on.mtt > 0)
        spread = {}
        for name, maps in (("off", off), ("on", on)):
            log_ratio = np.log(maps.mtt[use] / truth.mtt[use])
            q25, q50, q75 = np.percentile(log_ratio, [25, 50, 75])
            spread[name] = (q75 - q25, q50)
        assert spread["on"][0] < 0.9 * spread["off"][0]  # measured: 19 % narrower in white matter, 17 % in the core
        assert abs(spread["on"][1] - spread["off"][1]) < 0.03
    np.testing.assert_array_equal(on.cbv, off.cbv)  # only the transit time (and so CBF) is filtered
