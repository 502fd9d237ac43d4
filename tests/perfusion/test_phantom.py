"""The analysis against the digital phantom's ground truth, at 1 s and after sparse sampling.

Truth for the lesion masks: the phantom's core classes, and core + penumbra classes for
hypoperfusion (its penumbral grey matter has a 4 s delay but an 11 s MTT: every SVD analysis puts its
Tmax above 6 s, as clinical software would). Regions: the phantom's grey and white matter labels.

Known limitation, asserted so that a change shows: truncated SVD (threshold 0.1 of the largest
singular value) smooths the residue. With this phantom's broad AIF (first pass ~9 s FWHM plus
recirculation) that lowers CBF in normal grey/white matter by ~50-60 % and moves Tmax later: ~3 s
with bSVD, ~1.2 s with oSVD (which truncates less where it can). CBV (area ratio) is ~5 % low
because the tissue tail is still washing out at 60 s; the lesion masks are unaffected.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.evaluation.metrics import PerfusionAgreement, ReferenceMaps, perfusion_agreement
from ctp_node.perfusion import PerfusionMaps, PerfusionSettings, compute_perfusion
from ctp_node.phantom import PhantomConfig, TissueLabel, generate_phantom
from ctp_node.phantom.sampling import acquisition_times, parse_schedule, subsample
from model.baseline import linear_inpaint

# 8 HU at 0.47 mm pixels (measured on 80 kVp CTP) is about 4 HU at the 1.25 mm pixels of matrix 192.
NOISE_192_HU = 4.0
# The analyses these tests pin down: the former defaults (no or Gaussian noise handling, exponential
# residue). The default analysis is measured in test_noise_robust.py and benchmarks/.
PLAIN = PerfusionSettings(denoise="none", residue_family="exponential")
NOISY = PerfusionSettings(denoise="gaussian", smoothing_sigma_vox=1.0, residue_family="exponential")


def _study(noise_hu: float):
    return generate_phantom(PhantomConfig(matrix=192, slices=8, duration_s=61, noise_hu=noise_hu, lesion=True, seed=0))


@pytest.fixture(scope="module")
def clean():
    return _study(0.0)


@pytest.fixture(scope="module")
def noisy():
    return _study(NOISE_192_HU)


def _voxel_ml(study) -> float:
    return float(np.prod(study.spacing_mm)) / 1000.0


def _agreement(maps: PerfusionMaps, study, masks: str = "labels") -> PerfusionAgreement:
    """Against the truth maps; masks from the lesion labels, or the conventions applied to the truth."""
    truth = study.truth
    if masks == "labels":
        reference = ReferenceMaps(
            cbf=truth.cbf, cbv=truth.cbv, mtt=truth.mtt, tmax=truth.tmax,
            core_mask=truth.core_mask, hypoperfusion_mask=truth.core_mask | truth.penumbra_mask,
        )  # fmt: skip
    else:
        reference = ReferenceMaps.by_convention(truth.cbf, truth.cbv, truth.mtt, truth.tmax, truth.parenchyma_mask)
    regions = {"grey": truth.labels == TissueLabel.GREY_MATTER, "white": truth.labels == TissueLabel.WHITE_MATTER}
    return perfusion_agreement(maps, reference, regions, _voxel_ml(study))


def _report(label: str, a: PerfusionAgreement) -> None:
    pairs = [(m, r) for m in ("cbf", "cbv", "mtt") for r in ("grey", "white")]
    rel = " ".join(f"{m}:{r}={a.maps[m][r].median_rel_error:.3f}" for m, r in pairs)
    tmax = " ".join(f"tmax:{r}={a.maps['tmax'][r].median_abs_error:.2f}s" for r in ("grey", "white"))
    print(
        f"{label}: {rel} {tmax} core dice={a.core.dice:.3f} ({a.core.volume_error_ml:+.1f} mL) "
        f"hypo dice={a.hypoperfusion.dice:.3f} ({a.hypoperfusion.volume_error_ml:+.1f} mL)"
    )


def _sampled(study, step_s: int, method: str, settings: PerfusionSettings) -> PerfusionMaps:
    """Acquire every ``step_s`` seconds, fill the 1 s grid with the linear baseline, analyse."""
    at = acquisition_times(parse_schedule(f"every:{step_s}"), float(study.times_s[-1]))
    sequence, grid_s, _ = linear_inpaint(subsample(study.hu, study.times_s, at), at)
    return compute_perfusion(sequence, grid_s, _voxel_ml(study), method=method, settings=settings)


def test_noise_free_1s_recovers_volume_delay_and_lesions(clean):
    truth = clean.truth
    bsvd = compute_perfusion(clean.hu, clean.times_s, _voxel_ml(clean), method="bsvd", settings=PLAIN)
    osvd = compute_perfusion(clean.hu, clean.times_s, _voxel_ml(clean), method="osvd", settings=PLAIN)
    a_b, a_o = _agreement(bsvd, clean), _agreement(osvd, clean)
    _report("noise-free 1 s bSVD", a_b)
    _report("noise-free 1 s oSVD", a_o)
    assert np.array_equal(bsvd.brain_mask, truth.brain_mask)
    assert set(truth.labels[tuple(bsvd.aif_voxels.T)]) == {TissueLabel.ARTERY}
    for a in (a_b, a_o):
        for region in ("grey", "white"):
            assert a.maps["cbv"][region].median_rel_error < 0.15  # measured 0.04 / 0.05
        assert a.core.dice >= 0.8 and a.hypoperfusion.dice >= 0.8  # measured 0.99 / 1.0 (both methods)
        assert abs(a.core.volume_error_ml) < 1.0
    for region in ("grey", "white"):
        assert a_o.maps["tmax"][region].median_abs_error < 1.5  # measured 1.20 / 1.24 s
        assert 2.0 < a_b.maps["tmax"][region].median_error < 3.5  # the bSVD shift, measured 2.8 / 3.2 s
        # The truncation bias (module docstring), measured -58 % / -51 %: flow is underestimated ...
        assert -0.7 < a_b.maps["cbf"][region].median_error / np.median(truth.cbf[truth.labels == _label(region)]) < -0.4
    # ... but its order is kept: grey > white > penumbra > core.
    medians = [float(np.median(bsvd.cbf[truth.labels == lab])) for lab in (
        TissueLabel.GREY_MATTER, TissueLabel.WHITE_MATTER, TissueLabel.GM_PENUMBRA, TissueLabel.GM_CORE)]  # fmt: skip
    assert medians == sorted(medians, reverse=True)


def _label(region: str) -> TissueLabel:
    return TissueLabel.GREY_MATTER if region == "grey" else TissueLabel.WHITE_MATTER


def test_realistic_noise_errors_are_bounded(noisy):
    maps = compute_perfusion(noisy.hu, noisy.times_s, _voxel_ml(noisy), method="bsvd", settings=NOISY)
    a = _agreement(maps, noisy)
    _report(f"noise {NOISE_192_HU} HU 1 s bSVD, smoothing 1 voxel", a)
    for region in ("grey", "white"):
        assert a.maps["cbv"][region].median_rel_error < 0.35  # measured 0.22 / 0.25
        assert a.maps["tmax"][region].median_abs_error < 4.0  # measured 2.8 / 3.1 s (bSVD shift)
    assert a.hypoperfusion.dice > 0.85  # measured 0.96
    assert a.core.dice > 0.6  # measured 0.74
    assert abs(a.hypoperfusion.volume_error_ml) < 10.0  # of 69 mL; measured +2.3


def test_errors_grow_with_sparser_sampling_noise_free(clean):
    maps = {step: _sampled(clean, step, "bsvd", PLAIN) for step in (1, 4, 8)}
    to_truth = {step: _agreement(m, clean) for step, m in maps.items()}
    to_1s = {step: perfusion_agreement(m, maps[1], {"brain": clean.truth.parenchyma_mask}) for step, m in maps.items()}
    for step in (1, 4, 8):
        _report(f"noise-free every {step} s + linear, bSVD", to_truth[step])
    cbf_vs_1s = [to_1s[s].maps["cbf"]["brain"].median_rel_error for s in (1, 4, 8)]
    tmax_vs_1s = [to_1s[s].maps["tmax"]["brain"].median_abs_error for s in (1, 4, 8)]
    print(f"against the 1 s maps: CBF rel {cbf_vs_1s}, Tmax abs {tmax_vs_1s}")
    assert cbf_vs_1s[0] == 0.0 and 0.01 < cbf_vs_1s[1] < cbf_vs_1s[2]  # measured 0.031, 0.094
    assert tmax_vs_1s[1] < tmax_vs_1s[2]  # measured 0.04, 1.3 s
    grey_cbf = [to_truth[s].maps["cbf"]["grey"].median_rel_error for s in (1, 4, 8)]
    assert grey_cbf[0] < grey_cbf[1] < grey_cbf[2]  # measured 0.58, 0.60, 0.63
    assert to_truth[8].hypoperfusion.dice < to_truth[4].hypoperfusion.dice - 0.05  # measured 1.0 -> 0.91


def test_errors_grow_with_sparser_sampling_with_noise(noisy):
    maps = {step: _sampled(noisy, step, "bsvd", NOISY) for step in (1, 4, 8)}
    to_truth = {step: _agreement(m, noisy) for step, m in maps.items()}
    for step in (1, 4, 8):
        _report(f"noise {NOISE_192_HU} HU every {step} s + linear, bSVD", to_truth[step])
    for region in ("grey", "white"):
        cbv = [to_truth[s].maps["cbv"][region].median_rel_error for s in (1, 4, 8)]
        assert cbv[0] < cbv[1] < cbv[2] < 0.7  # measured grey 0.22, 0.31, 0.33; white 0.25, 0.42, 0.49
    hypo = [to_truth[s].hypoperfusion.dice for s in (1, 4, 8)]
    core = [to_truth[s].core.dice for s in (1, 4, 8)]
    assert hypo[0] > hypo[1] > hypo[2]  # measured 0.96, 0.86, 0.45
    assert core[0] > core[1] and core[0] > core[2]  # measured 0.74, 0.35, 0.28


@pytest.mark.parametrize("residue", ["exponential", "box"])
def test_noise_free_1s_parametric_recovers_the_truth(residue):
    """The issue's bar: CBF and CBV within 15 %, Tmax within 1 s, core and hypoperfusion Dice >= 0.8."""
    study = generate_phantom(
        PhantomConfig(matrix=192, slices=8, duration_s=61, noise_hu=0.0, lesion=True, seed=0, residue=residue)
    )
    settings = PerfusionSettings(residue_family=residue, denoise="none")
    maps = compute_perfusion(study.hu, study.times_s, _voxel_ml(study), method="parametric", settings=settings)
    a = _agreement(maps, study, masks="convention")
    _report(f"noise-free 1 s parametric ({residue}), masks by convention on the truth", a)
    for region in ("grey", "white"):
        assert a.maps["cbf"][region].median_rel_error < 0.15
        assert a.maps["cbv"][region].median_rel_error < 0.15
        assert a.maps["tmax"][region].median_abs_error < 1.0
    assert a.core.dice >= 0.8 and a.hypoperfusion.dice >= 0.8


def test_parametric_with_noise_and_sparse_sampling(noisy):
    """Errors are bounded with realistic noise and grow when the series is sampled every 4 s and 8 s."""
    maps = {step: _sampled(noisy, step, "parametric", NOISY) for step in (1, 4, 8)}
    to_truth = {step: _agreement(m, noisy, masks="convention") for step, m in maps.items()}
    for step in (1, 4, 8):
        _report(f"noise {NOISE_192_HU} HU every {step} s + linear, parametric", to_truth[step])
    for region in ("grey", "white"):
        assert to_truth[1].maps["cbf"][region].median_rel_error < 0.35
        assert to_truth[1].maps["tmax"][region].median_abs_error < 1.5
    cbf = [to_truth[s].maps["cbf"]["grey"].median_rel_error for s in (1, 4, 8)]
    hypo = [to_truth[s].hypoperfusion.dice for s in (1, 4, 8)]
    assert cbf[0] < cbf[2] and hypo[0] > hypo[2]


def test_parametric_fits_irregular_sampling_without_resampling(clean):
    """1.5 s for 20 s then 3 s: the model is fitted at the acquisition times themselves."""
    at = acquisition_times(parse_schedule("irregular:1.5@20,3"), float(clean.times_s[-1]))
    hu = subsample(clean.hu, clean.times_s, at)
    maps = compute_perfusion(hu, at, _voxel_ml(clean), method="parametric", settings=PLAIN)
    a = _agreement(maps, clean, masks="convention")
    _report("noise-free irregular 1.5/3 s parametric", a)
    for region in ("grey", "white"):
        assert a.maps["cbf"][region].median_rel_error < 0.15
        assert a.maps["tmax"][region].median_abs_error < 1.0
    assert a.hypoperfusion.dice >= 0.8
