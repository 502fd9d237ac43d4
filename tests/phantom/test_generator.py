"""The generator: shapes, determinism, truth consistency, expected enhancement, noise, motion, errors."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.phantom import PhantomConfig, TissueLabel, generate_phantom
from ctp_node.phantom.aif import AIF_SAMPLE_TIMES_S, AIF_SAMPLES_HU, reference_aif
from ctp_node.phantom.residue import residue
from ctp_node.phantom.tissue import K_HAEMATOCRIT_DENSITY, PERFUSION


def _enhancement(study, label: TissueLabel) -> np.ndarray:
    """Mean HU above the first volume over all voxels of ``label`` (float64)."""
    mask = study.truth.labels == label
    curve = study.hu[:, mask].astype(np.float64).mean(axis=1)
    return curve - curve[0]


def test_shapes_dtypes_and_geometry():
    study = generate_phantom(PhantomConfig(matrix=64, slices=2, duration_s=10, noise_hu=2.0))
    assert study.hu.shape == (10, 2, 64, 64) and study.hu.dtype == np.float32
    assert study.times_s.dtype == np.float64 and study.times_s.tolist() == list(range(10))
    assert study.spacing_mm == (5.0, 3.75, 3.75)
    assert study.aif_hu.shape == (10,)
    truth = study.truth
    for name in ("cbf", "cbv", "mtt", "tmax", "delay"):
        assert getattr(truth, name).shape == (2, 64, 64) and getattr(truth, name).dtype == np.float32
    assert truth.labels.dtype == np.uint8
    assert truth.core_mask.dtype == truth.penumbra_mask.dtype == truth.brain_mask.dtype == np.bool_
    assert study.hu.min() >= -1024.0  # scanners clip at the stored-value floor


def test_same_seed_same_study_other_seed_other_noise(small_study):
    again = generate_phantom(small_study.config)
    assert np.array_equal(again.hu, small_study.hu)
    assert np.array_equal(again.truth.cbf, small_study.truth.cbf)
    other = generate_phantom(PhantomConfig(**{**small_study.config.__dict__, "seed": 4}))
    assert not np.array_equal(other.hu, small_study.hu)


def test_truth_is_consistent_with_the_residue_used(small_study):
    truth = small_study.truth
    tissue = truth.parenchyma_mask
    np.testing.assert_allclose(truth.cbv[tissue], truth.cbf[tissue] * truth.mtt[tissue] / 60.0, rtol=1e-5)
    assert np.array_equal(truth.tmax, truth.delay)
    for name in ("cbf", "cbv", "mtt", "tmax"):
        assert np.all(getattr(truth, name)[~tissue] == 0)
    assert truth.cbf[tissue].min() > 0
    # per-voxel variation around the class values (10 % relative by default)
    grey = truth.labels == TissueLabel.GREY_MATTER
    assert 45 < truth.cbf[grey].mean() < 61 and truth.cbf[grey].std() > 1.0


def test_lesion_masks_lie_in_the_left_mca_territory(small_study):
    truth = small_study.truth
    assert truth.core_mask.sum() > 0 and truth.penumbra_mask.sum() > truth.core_mask.sum()
    assert not np.any(truth.core_mask & truth.penumbra_mask)
    assert np.all(truth.brain_mask[truth.core_mask | truth.penumbra_mask])
    columns = np.nonzero(truth.core_mask | truth.penumbra_mask)[2]
    assert columns.min() > 32  # +x is the patient's left: columns right of the midline
    core = truth.labels[truth.core_mask]
    assert set(np.unique(core)) <= {TissueLabel.GM_CORE, TissueLabel.WM_CORE}
    # core CBF is below 30 % of normal grey matter, as clinical core definitions require
    assert truth.cbf[truth.core_mask].max() < 0.3 * 53.0


def test_no_lesion_means_no_lesion_labels():
    study = generate_phantom(PhantomConfig(matrix=64, slices=2, duration_s=4, lesion=False))
    assert not study.truth.core_mask.any() and not study.truth.penumbra_mask.any()
    assert set(np.unique(study.truth.labels)) <= set(range(8))


def test_class_values_without_variation(clean_study):
    truth = clean_study.truth
    for label, values in PERFUSION.items():
        mask = truth.labels == label
        assert mask.any(), label
        np.testing.assert_allclose(truth.cbf[mask], values.cbf, rtol=1e-6)
        np.testing.assert_allclose(truth.mtt[mask], values.mtt, rtol=1e-6)
        np.testing.assert_allclose(truth.delay[mask], values.delay, atol=1e-6)


def test_peak_enhancement_matches_the_reference_phantom(clean_study):
    grey = _enhancement(clean_study, TissueLabel.GREY_MATTER)
    assert 17.0 < grey.max() < 21.0 and 21 <= int(grey.argmax()) <= 25
    white = _enhancement(clean_study, TissueLabel.WHITE_MATTER)
    assert 8.5 < white.max() < 11.5
    penumbra = _enhancement(clean_study, TissueLabel.GM_PENUMBRA)
    assert 9.0 < penumbra.max() < 13.0 and penumbra.argmax() > grey.argmax()
    core = _enhancement(clean_study, TissueLabel.GM_CORE)
    assert 2.0 < core.max() < 4.5
    assert np.all(_enhancement(clean_study, TissueLabel.CSF) == 0)


def test_tissue_curve_equals_an_independent_convolution(clean_study):
    """One grey-matter voxel against CBF/6000/k * (AIF conv R(. - delay)) on a 1 ms grid."""
    z, y, x = np.argwhere(clean_study.truth.labels == TissueLabel.GREY_MATTER)[0]
    step = 0.001
    fine = np.arange(0.0, 40.0, step)
    r = np.where(fine >= 1.0, residue(np.clip(fine - 1.0, 0, None), 3.7, "exponential"), 0.0)
    curve = 53.0 / 6000.0 / K_HAEMATOCRIT_DENSITY * np.convolve(reference_aif(fine), r)[: fine.size] * step
    expected = curve[np.rint(clean_study.times_s / step).astype(int)]
    measured = clean_study.hu[:, z, y, x].astype(np.float64) - 35.0
    np.testing.assert_allclose(measured, expected, atol=0.05)


def test_box_residue_changes_curves_not_the_truth_relation():
    common = dict(matrix=64, slices=2, duration_s=30, perfusion_variation=0.0, delay_variation_s=0.0)
    box = generate_phantom(PhantomConfig(residue="box", **common))
    exp = generate_phantom(PhantomConfig(residue="exponential", **common))
    tissue = box.truth.parenchyma_mask
    np.testing.assert_allclose(box.truth.cbv[tissue], box.truth.cbf[tissue] * box.truth.mtt[tissue] / 60, rtol=1e-5)
    assert np.array_equal(box.truth.cbv, exp.truth.cbv)
    assert np.abs(box.hu - exp.hu).max() > 1.0


@pytest.mark.parametrize("kind", ["exponential", "box"])
def test_residue_starts_at_one_and_integrates_to_mtt(kind):
    t = np.arange(0.0, 200.0, 0.001)
    values = residue(t, 4.6, kind)
    assert residue(np.array([0.0]), 4.6, kind)[0] == 1.0
    assert np.trapezoid(values, t) == pytest.approx(4.6, abs=2e-3)


def test_aif_passes_through_the_listed_samples():
    np.testing.assert_allclose(reference_aif(AIF_SAMPLE_TIMES_S), AIF_SAMPLES_HU, atol=1e-6)
    fine = np.arange(0.0, 70.0, 0.01)
    aif = reference_aif(fine)
    assert aif.max() == pytest.approx(485.0, abs=3.0) and abs(fine[aif.argmax()] - 19.0) < 0.5
    assert np.all(aif[fine < 7.0] < 1.0) and np.all(aif >= 0)
    assert np.all(np.abs(np.diff(aif)) < 1.5)  # smooth: < 150 HU/s at the steepest
    assert 40 < reference_aif(np.array([60.0]))[0] < 130  # washout continues past the last sample


def test_arteries_carry_the_aif_and_the_sinus_peaks_later(clean_study):
    assert clean_study.aif_hu.max() == pytest.approx(485.0, abs=1e-6) and clean_study.aif_hu.argmax() == 19
    vein = _enhancement(clean_study, TissueLabel.VEIN)
    assert vein.argmax() >= 19 + 4 and vein.max() > 200


def test_mca_branches_on_the_lesion_side_fill_late():
    from ctp_node.phantom.anatomy import COLLATERAL_ARTERY, DISTAL_ARTERY, Grid, Lesion, head_labels
    from ctp_node.phantom.generator import reference_grid

    cfg = PhantomConfig(matrix=96, slices=8)
    grid: Grid = reference_grid(cfg)
    lesion = Lesion(cfg.lesion_centre_mm, cfg.lesion_core_radius_mm, cfg.lesion_penumbra_radius_mm)
    _, kinds = head_labels(grid, lesion)
    x = grid.coords()[0]
    collateral = kinds == COLLATERAL_ARTERY
    assert collateral.any() and np.all(np.broadcast_to(x, kinds.shape)[collateral] > 0)  # patient left only
    assert np.any(kinds[..., :48] == DISTAL_ARTERY)  # the right M2 stays patent
    _, without = head_labels(grid, None)
    assert not np.any(without == COLLATERAL_ARTERY)


def test_noise_has_the_requested_std_and_is_correlated():
    common = dict(matrix=256, slices=1, duration_s=3, lesion=False, seed=11)
    clean = generate_phantom(PhantomConfig(noise_hu=0.0, **common))
    noisy = generate_phantom(PhantomConfig(noise_hu=8.0, **common))
    brain = clean.truth.brain_mask[0]
    diff = (noisy.hu - clean.hu)[:, 0]
    assert np.std(diff[:, brain]) == pytest.approx(8.0, rel=0.03)
    sigma_px = 0.7 / (240.0 / 256)
    expected = np.exp(-1.0 / (4 * sigma_px**2))
    lag1 = np.corrcoef(diff[:, :, :-1].ravel(), diff[:, :, 1:].ravel())[0, 1]
    assert lag1 == pytest.approx(expected, abs=0.03)


def test_patch_std_of_correlated_noise_is_lower_as_documented():
    """At 512 x 512 (0.47 mm pixels) 8 x 8 patches show about 0.83 of the per-voxel std."""
    from ctp_node.phantom.noise import correlated_noise

    noise = correlated_noise(np.random.default_rng(0), (4, 512, 512), 10.0, 0.7 / (240.0 / 512))
    patches = noise.reshape(4, 64, 8, 64, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64)
    assert patches.std(axis=1, ddof=1).mean() == pytest.approx(8.3, abs=0.2)


def test_motion_moves_only_the_chosen_volume():
    common = dict(matrix=64, slices=3, duration_s=6, noise_hu=0.0)
    still = generate_phantom(PhantomConfig(**common))
    moved = generate_phantom(PhantomConfig(motion_volumes=(3,), motion_translation_mm=4.0, **common))
    (motion,) = moved.motion
    assert motion.volume == 3 and max(abs(v) for v in motion.translation_mm) <= 4.0
    for t in (0, 1, 2, 4, 5):
        assert np.array_equal(moved.hu[t], still.hu[t])
    assert np.abs(moved.hu[3] - still.hu[3]).max() > 100  # the skull edge moved
    assert np.array_equal(moved.truth.cbf, still.truth.cbf)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"duration_s": -5}, "duration_s"),
        ({"duration_s": 1}, "duration_s"),
        ({"matrix": 10}, "matrix"),
        ({"slices": 0}, "slices"),
        ({"noise_hu": -1.0}, "noise_hu"),
        ({"residue": "gamma"}, "residue"),
        ({"slice_thickness_mm": 0.0}, "slice_thickness_mm"),
        ({"perfusion_variation": 0.9}, "perfusion_variation"),
        ({"lesion_core_radius_mm": 30.0, "lesion_penumbra_radius_mm": 20.0}, "penumbra surrounds the core"),
        ({"lesion_centre_mm": (200.0, 0.0, 0.0)}, "not inside the brain"),
        ({"lesion_centre_mm": (2.0, 0.0, 0.0)}, "MCA territory"),
        ({"slices": 2, "lesion_centre_mm": (40.0, -5.0, 40.0)}, "outside the imaged slab"),
        ({"motion_volumes": (61,)}, "motion_volumes"),
    ],
)
def test_bad_parameters_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**changes)
