"""CBF's spread under the study's own noise and the core volume's range (``perfusion.uncertainty``).

The claim checked: the spread the replicates estimate from one noisy series is the spread the analysis really
has across independent noise draws of the same head (a Monte Carlo over seeds of the analytic head of
``tests/perfusion/synthetic.py``, whose lesion, CBF 8 of 50, is low-flow tissue)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctp_node.perfusion import reliability
from ctp_node.perfusion import uncertainty as unc
from tests.perfusion.synthetic import HEAD_TIMES_S, head_maps, interior, synthetic_head

SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def draws():
    """The analytic head at 6 HU under five independent noise draws: (maps per draw, lesion interior)."""
    out = []
    for seed in SEEDS:
        hu, truth = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=seed, size=96)
        out.append(head_maps(hu))
    return out, interior(truth["lesion"], 2), interior(truth["normal"], 2)


def test_the_replicates_spread_is_the_spread_across_independent_noise_draws(draws):
    maps, lesion, normal = draws
    for m in maps:
        assert m.cbf_sd is not None and m.cbf_sd_evaluated is not None
        assert m.cbf_sd_evaluated[lesion].mean() > 0.95  # the whole low-flow lesion is evaluated
    # The truth: the robust spread (as the estimate is: CBF's tail is heavy) over the five independent draws.
    draws_cbf = np.stack([m.cbf[lesion] for m in maps])
    across = 1.4826 * np.median(np.abs(draws_cbf - np.median(draws_cbf, axis=0)), axis=0)
    for m in maps:
        estimated = m.cbf_sd[lesion]
        ratio = np.median(estimated) / np.median(across)
        assert 0.67 < ratio < 1.5, ratio  # measured 1.09-1.32 against these five draws
    # Normal tissue (CBF 50, rCBF 1) is hardly evaluated: it cannot cross the core threshold.
    assert maps[0].cbf_sd_evaluated[normal].mean() < 0.01


def test_the_core_range_is_reported_and_counts_apart_what_lies_within_noise_of_the_threshold(draws):
    maps, _, _ = draws
    check = maps[0].volume_checks["core"]
    noise = check.noise
    assert noise is not None and noise.replicates == unc.REPLICATES
    assert noise.low_ml <= check.measured_ml <= noise.high_ml
    assert 0.0 <= noise.uncertain_ml <= check.measured_ml
    # The range is the noise's effect on this volume: the five draws' cores lie within a few widths of it.
    cores = [m.volume_checks["core"].measured_ml for m in maps]
    assert np.std(cores, ddof=1) < 3.0 * max(noise.half_width_ml, 0.05 * check.measured_ml)
    summary = maps[0].summary()["volume_checks"]["core"]
    assert summary["noise"]["range_ml"] == [noise.low_ml, noise.high_ml]
    assert any("replicates of the study" in note for note in maps[0].notes)


def test_the_same_series_gives_the_same_spread():
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=7, size=64)
    first, second = head_maps(hu), head_maps(hu)
    np.testing.assert_array_equal(first.cbf_sd, second.cbf_sd)
    assert first.volume_checks["core"].noise == second.volume_checks["core"].noise


def test_off_or_for_another_cbf_no_spread_is_claimed():
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=7, size=64)
    off = head_maps(hu, uncertainty_replicates=0)
    assert off.cbf_sd is None and off.volume_checks["core"].noise is None
    other = head_maps(hu, low_flow_cbf="fit")
    assert other.cbf_sd is None and other.volume_checks["core"].noise is None
    assert any("CBF spread not estimated" in note for note in other.notes)
    # By default (no noise correction) the replicates change no map or mask: the estimate itself is the study's.
    baseline = head_maps(hu)
    assert baseline.cbf_sd is not None and baseline.cbf_noise_bias is None
    np.testing.assert_array_equal(off.cbf, baseline.cbf)
    np.testing.assert_array_equal(off.core_mask, baseline.core_mask)
    assert off.reference_cbf == baseline.reference_cbf and baseline.reference_cbf_measured is None


def test_without_noise_nothing_is_estimated():
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=0.0, seed=0, size=64)
    maps = head_maps(hu)
    assert maps.cbf_sd is None and maps.volume_checks["core"].noise is None


def test_the_replicate_pipeline_repeats_the_study_analysis(monkeypatch):
    """Without added noise and from the unfiltered curves, a replicate is the study's own analysis: its CBF at
    the targets is the map's (the check that every step of the analysis is repeated, not approximated)."""
    hu, truth = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=3, size=64)
    seen = {}
    original = unc.cbf_spread

    def spy(curves, targets, *args, **kwargs):
        seen["repeat"] = original(curves, targets, *args[:5], replicates=1, noise_scale=0.0, from_filtered=False)
        return original(curves, targets, *args, **kwargs)

    monkeypatch.setattr(unc, "cbf_spread", spy)
    maps = head_maps(hu)
    repeat = seen["repeat"]
    study = maps.cbf.reshape(-1)[repeat.targets]
    relative = np.abs(repeat.values[0] - study) / np.maximum(study, 1.0)
    assert np.median(relative) < 0.01 and np.quantile(relative, 0.9) < 0.05, np.quantile(relative, [0.5, 0.9])


def _correlated_image(rng, sigma_px: float, shape=(4, 96, 96)) -> np.ndarray:
    white = rng.standard_normal(shape)
    image = ndimage.gaussian_filter(white, (0, sigma_px, sigma_px))
    return (image / image.std()).astype(np.float32)


def _lag_correlation(fields: np.ndarray, lag: int) -> float:
    a, b = fields[..., :, :-lag], fields[..., :, lag:]
    return float(np.mean(a * b) / np.sqrt(np.mean(a * a) * np.mean(b * b)))


@pytest.mark.parametrize("sigma_px", [0.0, 1.0, 2.0])
def test_injected_noise_has_the_texture_of_the_study_noise(sigma_px):
    rng = np.random.default_rng(5)
    image = _correlated_image(rng, sigma_px) if sigma_px else rng.standard_normal((4, 96, 96)).astype(np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[:, 10:86, 12:84] = True
    kernel = unc.noise_kernel(np.where(mask, image, 0), mask, pixel_mm=1.0)
    fields = np.stack(unc.correlated_noise(np.random.default_rng(0), (3, 2, 80, 80), kernel, count=4))
    assert fields.shape == (4, 3, 2, 80, 80) and fields.dtype == np.float32
    assert abs(float(fields.std()) - 1.0) < 0.05
    for lag in (1, 2):
        assert abs(_lag_correlation(fields, lag) - _lag_correlation(image[:, 10:86, 12:84], lag)) < 0.06
    # The fields are independent of each other (windows a kernel's width apart share no white noise).
    assert abs(float(np.mean(fields[0] * fields[1]))) < 0.1  # chance level with ~800 independent samples: 0.04


def test_a_volume_whose_noise_range_is_too_wide_is_withheld_with_the_reason():
    tissue = np.ones((2, 10, 10), dtype=bool)
    masks = {name: np.zeros_like(tissue) for name in reliability.VOLUMES}
    masks["core"][:, 2:5, 2:5] = True
    wide = reliability.NoiseRange(low_ml=2.0, high_ml=20.0, uncertain_ml=4.0, replicates=8)
    narrow = reliability.NoiseRange(low_ml=8.0, high_ml=12.0, uncertain_ml=4.0, replicates=8)
    common = dict(tissue=tissue, voxel_ml=0.5, interval_s=1.0, mirror_limit_ml=0.0)
    withheld = reliability.check_volumes(masks, **common, noise={"core": wide}, noise_limit_ml=5.0)["core"]
    assert withheld.withheld is not None and "noise" in withheld.withheld and "9.0" in withheld.withheld
    reported = reliability.check_volumes(masks, **common, noise={"core": narrow}, noise_limit_ml=5.0)["core"]
    assert reported.withheld is None and reported.noise == narrow
    assert reported.summary()["noise"]["threshold_uncertain_ml"] == 4.0
    never = reliability.check_volumes(masks, **common, noise={"core": wide}, noise_limit_ml=0.0)["core"]
    assert never.withheld is None


def test_replicates_that_repeat_the_study_give_its_core_exactly(monkeypatch):
    """The replicates' cores are cleaned on a box around the low-flow region only: with every replicate equal to
    the study's own CBF the range collapses onto the measured core (nothing of the core lies outside the box)."""
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=3, size=64)
    original = unc.cbf_spread
    holder = {}

    def repeated(curves, targets, *args, **kwargs):
        spread = original(curves, targets, *args, **kwargs)
        study = holder["cbf"].reshape(-1)[spread.targets]
        # Every replicate is the study, and so is the noise-free pass: noise moves nothing, nothing is corrected.
        pass_ = kwargs.get("noise_free_pass", False)
        zero = np.zeros(study.size) if pass_ else None
        return unc.CbfSpread(spread.targets, spread.sd, 3, np.stack([study] * 3), study if pass_ else None, zero)

    holder["cbf"] = head_maps(hu, uncertainty_replicates=0).cbf
    monkeypatch.setattr(unc, "cbf_spread", repeated)
    for corrected in (False, True):
        maps = head_maps(hu, noise_bias_correction=corrected)
        noise = maps.volume_checks["core"].noise
        assert maps.volume_checks["core"].measured_ml > 5.0
        assert noise.low_ml == noise.high_ml == maps.volume_checks["core"].measured_ml
    assert maps.reference_cbf == maps.reference_cbf_measured  # nothing to correct either


# The noise correction (``PerfusionSettings.noise_bias_correction``, a candidate, not the default): the replicates'
# shift under noise taken off the rCBF reference and off low-flow tissue's CBF.


def test_the_corrected_reference_is_nearer_the_noise_free_one(draws):
    """The reference is the median of normal tissue's CBF; on the analytic head the noise moves it down by about
    2 %. Over the five draws the corrected reference lies nearer the noise-free analysis' than the measured
    one does (measured: -0.77 mL/100 g/min on the mean, corrected: +0.16)."""
    maps, _, _ = draws
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=0.0, seed=0, size=96)
    noise_free = head_maps(hu).reference_cbf
    measured = np.array([m.reference_cbf for m in maps])
    corrected_maps = [
        head_maps(synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=seed, size=96)[0], noise_bias_correction=True)
        for seed in SEEDS
    ]
    assert [m.reference_cbf_measured for m in corrected_maps] == list(measured)
    corrected = np.array([m.reference_cbf for m in corrected_maps])
    assert not np.array_equal(measured, corrected)
    assert abs(corrected.mean() - noise_free) < 0.5 * abs(measured.mean() - noise_free), (measured, corrected)
    for m in corrected_maps:
        assert any(f"less the {m.reference_cbf_measured - m.reference_cbf:+.1f}" in note for note in m.notes)
        assert m.summary()["reference_cbf_measured"] == m.reference_cbf_measured


def test_the_corrected_flows_are_the_fitted_ones_less_the_noise_bias():
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=7, size=64)
    corrected, fitted = head_maps(hu, noise_bias_correction=True), head_maps(hu)
    evaluated = corrected.cbf_sd_evaluated
    assert corrected.cbf_noise_bias is not None and evaluated.any()
    np.testing.assert_array_equal(corrected.cbf[~evaluated], fitted.cbf[~evaluated])  # only low-flow tissue
    expected = np.maximum(fitted.cbf[evaluated] - corrected.cbf_noise_bias[evaluated], 0.0)
    np.testing.assert_allclose(corrected.cbf[evaluated], expected, rtol=1e-6, atol=1e-6)
    assert np.all(corrected.cbf_noise_bias[~evaluated] == 0)
    np.testing.assert_array_equal(corrected.cbv, fitted.cbv)  # CBV and MTT are as fitted
    np.testing.assert_array_equal(corrected.mtt, fitted.mtt)
    assert corrected.reference_cbf_measured == fitted.reference_cbf


def test_the_noise_bias_estimates_follow_what_the_noise_does_on_a_phantom():
    """Family A (exponential residue, 192 x 192 x 8) at 6 HU against the same study without noise: the
    replicates' estimates of what the noise adds to the reference and to the low-flow core's CBF have the sign
    and the size of what it does add (seed 11: reference +2.46 against +2.75 estimated, core +0.29 against
    +0.49, mL/100 g/min). Not everywhere so close: docs/benchmarks.md has the box residues, where the core's is
    3-5 times underestimated, and the analytic head, where it has the wrong sign (-0.1 against +0.3)."""
    from ctp_node.perfusion import PerfusionSettings, compute_perfusion
    from ctp_node.phantom import PhantomConfig, generate_phantom

    def analyse(noise_hu: float):
        study = generate_phantom(
            PhantomConfig(matrix=192, slices=8, noise_hu=noise_hu, seed=11, lesion_centre_mm=(-38.0, 5.0, 0.0))
        )
        voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
        settings = PerfusionSettings(pixel_mm=float(study.spacing_mm[2]), noise_bias_correction=True)
        return study, compute_perfusion(study.hu, study.times_s, voxel_ml, method="parametric", settings=settings)

    study, noisy = analyse(6.0)
    _, clean = analyse(0.0)
    actual_shift = noisy.reference_cbf_measured - clean.reference_cbf
    estimated_shift = noisy.reference_cbf_measured - noisy.reference_cbf
    assert 0.5 < estimated_shift / actual_shift < 2.0, (estimated_shift, actual_shift)
    truth = study.truth
    core = truth.parenchyma_mask & (truth.cbf < 0.3 * np.median(truth.cbf[clean.reference_mask]))
    evaluated = core & noisy.cbf_sd_evaluated & noisy.tissue_mask & clean.tissue_mask
    fitted = noisy.cbf + noisy.cbf_noise_bias  # the noisy study's flows before the correction
    actual_bias = float(np.median(fitted[evaluated] - clean.cbf[evaluated]))
    estimated_bias = float(np.median(noisy.cbf_noise_bias[evaluated]))
    assert actual_bias > 0 and 0.5 < estimated_bias / actual_bias < 2.5, (estimated_bias, actual_bias)


def test_a_reference_shift_beyond_half_the_reference_is_not_taken_off(monkeypatch):
    hu, _ = synthetic_head(HEAD_TIMES_S, noise_hu=6.0, seed=7, size=64)
    fitted = head_maps(hu)
    monkeypatch.setattr(unc, "median_shift", lambda spread: 0.6 * fitted.reference_cbf)
    maps = head_maps(hu, noise_bias_correction=True)
    assert maps.reference_cbf == maps.reference_cbf_measured == fitted.reference_cbf
    assert any(note.startswith("rCBF reference not corrected for noise") for note in maps.notes)
    assert maps.cbf_noise_bias is not None  # the low-flow flows are still corrected
