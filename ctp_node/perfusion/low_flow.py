"""Tmax of low-flow tissue from a wider, still edge-preserving, neighbourhood.

Why: a voxel's Tmax is as precise as its curve's signal. Normal tissue enhances by 10-40 HU and the
TIPS filter's 2 mm neighbourhood pins its delay to a few tenths of a second at 6 HU. Hypoperfused
tissue enhances by 1-3 HU, and there the same neighbourhood leaves the delay scattered by seconds
(family A's 8 s penumbra at 6 HU: 20 % of its interior below 6 s; the issue-shaped set's core, truly
4.5 s: 29 % above 6 s). Both volumes that decide on treatment, Tmax > 6 s and the core inside it, are
thresholds of exactly that tissue, so the scatter becomes volume: missed penumbra on one study, false
hypoperfusion on another. The delay of ischaemic tissue is a property of its arterial territory, smooth
over centimetres, so pooling more curves there costs little resolution.

What: voxels whose flow is below ``LOW_FLOW_RCBF`` of normally perfused tissue's (a preliminary
reference by ``lesion``'s rule) are filtered again from their unfiltered curves with a spatial sigma
of ``SPATIAL_SIGMA_MM`` (``denoise.tips_filter_at``: the cost follows the number of such voxels, not the
image), fitted again with the study's residue shape, and take that fit's delay as their Tmax. The range
weight compares the first pass's filtered curves (at the first pass's noise scale): with the raw 1 mm
guide, normal white matter next to family A's penumbra passed for penumbra often enough to pull the
penumbra's outer 2.5 mm early (Tmax > 6 s shortfall 8.9 mL with the raw guide, 6.4 with the filtered
one; issue-shaped set +0.2 and 0.0 mL).

CBF, CBV and MTT stay those of the first pass by default (``PerfusionSettings.low_flow_cbf``): the wide
fit's flow amplitude is free of the truncation that lowers CBV / MTT in slow, delayed tissue, but
mixing two estimators whose biases differ when the residue shape is off broke the cancellation in rCBF
(box residues: core -6.1 mL), and the amplitude of the weakest curves is biased high (family A's core
CBF +43 %). Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.perfusion import denoise, lesion, parametric, validity

LOW_FLOW_RCBF = 0.5  # of the reference flow: below it, a voxel's Tmax comes from the wide neighbourhood
SPATIAL_SIGMA_MM = 6.0
STENCIL_STEP_MM = 2.0  # a third of the sigma: the Gaussian weight is sampled finely enough
CBF_MODES = ("area", "fit", "wide", "widecomplete")  # see PerfusionSettings.low_flow_cbf


@dataclass(frozen=True)
class UnfilteredCurves:
    """What the wide filter needs of the TIPS step: the parenchyma's unfiltered coefficients and their noise."""

    coefficients: np.ndarray  # (K, Z, Y, X) float32 on ``basis``
    basis: np.ndarray  # (K, N) orthonormal rows on the uniform grid
    mask: np.ndarray  # (Z, Y, X) bool: the filtered parenchyma
    noise: denoise.NoiseEstimate
    noise_cov: np.ndarray  # (K, K) per unit frame noise variance
    pixel_mm: float
    filtered: np.ndarray  # (K, Z, Y, X) float32: the first pass's output, the wide pass's guide
    scales: denoise.RangeScales | None = None  # the first pass's range scales (None: not kept)


@dataclass(frozen=True)
class WideFit:
    """Per target voxel (n,): the wide neighbourhood's fit."""

    tmax_s: np.ndarray
    flow: np.ndarray  # 1/s, the fitted amplitude
    mtt_s: np.ndarray  # the fitted transit time (0 where nothing was fitted)
    area_hu_frames: np.ndarray  # sum over the grid of the filtered curve less its re-estimated offset


def low_flow_voxels(
    tissue: np.ndarray, fitted: np.ndarray, cbf: np.ndarray, tmax: np.ndarray, hypoperfusion_tmax_s: float,
    normal_tmax_s: float, rcbf: float = LOW_FLOW_RCBF,
) -> np.ndarray:  # fmt: skip
    """(Z, Y, X) bool: fitted tissue with CBF below ``rcbf`` of the preliminary reference (``lesion``'s rule on
    the maps as they are); none when the reference is not positive."""
    candidates = tissue & fitted
    hypo = candidates & (tmax > hypoperfusion_tmax_s)
    region = lesion.reference_region(candidates, tmax, hypo, normal_tmax_s)
    reference = float(np.median(cbf[region])) if region.any() else 0.0
    if not reference > 0:
        return np.zeros(tissue.shape, dtype=bool)
    return candidates & (cbf < rcbf * reference)


def wide_fit(
    curves: UnfilteredCurves, targets: np.ndarray, study: parametric.StudyFit, sigma_mm: float = SPATIAL_SIGMA_MM
) -> WideFit | None:
    """The fit of ``targets`` (flat indices into the volume, inside ``curves.mask``) from their curves
    TIPS-filtered over ``sigma_mm`` and fitted like the main fit (``study``: for the gamma family the study's
    residue shape or, with None, each voxel's; baseline re-estimated before each voxel's bolus). None:
    nothing to filter."""
    if targets.size == 0:
        return None
    coefficients = denoise.tips_filter_at(
        curves.coefficients, curves.mask, targets, curves.noise, curves.pixel_mm, sigma_mm,
        noise_cov=curves.noise_cov, step_mm=STENCIL_STEP_MM,
        guide_source=curves.filtered,
    )  # fmt: skip
    if coefficients is None:  # no noise measured: nothing to pool
        return None
    filtered = coefficients.T @ curves.basis  # (n, N)
    stats, mtt = study.refit(filtered, curves.basis)
    area = filtered.sum(axis=1, dtype=np.float64) - stats.offset_hu * filtered.shape[1]
    return WideFit(tmax_s=stats.tmax_s, flow=stats.flow, mtt_s=mtt, area_hu_frames=area)


def wide_cbf(
    wide: WideFit, mode: str, k: float, aif_grid: np.ndarray, grid_s: np.ndarray, residue_shape: float | None,
    max_completed_share: float,
) -> np.ndarray:  # fmt: skip
    """CBF (mL/100 g/min) of the targets from their wide fit (``PerfusionSettings.low_flow_cbf`` candidates):
    "fit", the flow amplitude; "wide", CBV / MTT of the wide curves; "widecomplete", that CBV divided by the
    share of the response inside the acquisition (``validity.missing_area_fraction``, at most
    ``max_completed_share`` missing)."""
    if mode == "fit":
        return k * wide.flow * 6000.0
    fitted = wide.mtt_s > 0
    cbv = k * 100.0 * wide.area_hu_frames / float(np.sum(aif_grid))
    if mode == "widecomplete" and residue_shape is not None:
        missing = validity.missing_area_fraction(aif_grid, grid_s, wide.mtt_s, wide.tmax_s, fitted, residue_shape)
        cbv = cbv / (1.0 - np.minimum(missing, max_completed_share))
    return np.where(fitted, np.maximum(cbv, 0.0) / np.where(fitted, wide.mtt_s, 1.0) * 60.0, 0.0)
