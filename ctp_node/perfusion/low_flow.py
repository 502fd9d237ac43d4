"""Tmax of low-flow tissue from a wider, still edge-preserving, neighbourhood.

Why: a voxel's Tmax is as precise as its curve's signal. Normal tissue enhances by 10-40 HU and the
TIPS filter's 2 mm neighbourhood pins its delay to a few tenths of a second at 6 HU. Hypoperfused
tissue enhances by 1-3 HU, and there the same neighbourhood leaves the delay scattered by about
+-1.7 s between quartiles (family A's 8 s penumbra at 6 HU: 20 % of its interior below 6 s; the
issue-shaped set's core, truly 4.5 s: 29 % above 6 s). Both volumes that decide on treatment, Tmax > 6 s
and the core inside it, are thresholds of exactly that tissue, so the scatter becomes volume: missed
penumbra on one study, false hypoperfusion on another. The delay of ischaemic tissue is a property of
its arterial territory, smooth over centimetres, so pooling more curves there costs little resolution;
the TIPS range weight still keeps normal tissue (whose curves differ by far more than noise) out.

What: voxels whose flow is below ``LOW_FLOW_RCBF`` of normally perfused tissue's (a preliminary
reference by ``lesion``'s rule) are filtered again from their unfiltered curves with the same range
weight and a spatial sigma of ``SPATIAL_SIGMA_MM`` (``denoise.tips_filter_at``: the cost follows
the number of such voxels, not the image), fitted again with the study's residue shape, and take that
fit's delay as their Tmax. CBF, CBV and MTT are not touched: a wider neighbourhood blurs flow across
the core's rim, where the core threshold sits (measured: family A's core +3.8 mL with the whole
analysis at 4 mm), while a delay is shared by the core and the penumbra around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.perfusion import denoise, lesion, parametric

LOW_FLOW_RCBF = 0.5  # of the reference flow: below it, a voxel's Tmax comes from the wide neighbourhood
SPATIAL_SIGMA_MM = 6.0
STENCIL_STEP_MM = 2.0  # a third of the sigma: the Gaussian weight is sampled finely enough


@dataclass(frozen=True)
class UnfilteredCurves:
    """What the wide filter needs of the TIPS step: the parenchyma's unfiltered coefficients and their noise."""

    coefficients: np.ndarray  # (K, Z, Y, X) float32 on ``basis``
    basis: np.ndarray  # (K, N) orthonormal rows on the uniform grid
    mask: np.ndarray  # (Z, Y, X) bool: the filtered parenchyma
    noise: denoise.NoiseEstimate
    noise_cov: np.ndarray  # (K, K) per unit frame noise variance
    pixel_mm: float


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


def wide_tmax(
    curves: UnfilteredCurves,
    targets: np.ndarray,
    grid_s: np.ndarray,
    aif_grid: np.ndarray,
    arrival_s: float,
    acquired_s: np.ndarray,
    family: parametric.ResidueFamily,
    residue_shape: float | None,
    sigma_mm: float = SPATIAL_SIGMA_MM,
) -> np.ndarray | None:
    """Tmax (s) of ``targets`` (flat indices into the volume, inside ``curves.mask``) from their curves
    TIPS-filtered over ``sigma_mm`` and fitted like the main fit (``family``; for the gamma family the study's
    ``residue_shape`` or, with None, each voxel's; baseline re-estimated before each voxel's bolus). None:
    nothing to filter."""
    if targets.size == 0:
        return None
    coefficients = denoise.tips_filter_at(
        curves.coefficients, curves.mask, targets, curves.noise, curves.pixel_mm, sigma_mm,
        noise_cov=curves.noise_cov, step_mm=STENCIL_STEP_MM,
    )  # fmt: skip
    if coefficients is None:
        return None
    filtered = coefficients.T @ curves.basis  # (n, N)
    stats, _ = parametric.deconvolve_parametric(
        filtered, grid_s, aif_grid, family, basis=curves.basis, arrival_s=arrival_s, acquired_s=acquired_s,
        shape=residue_shape if family == "gamma" else None,
    )  # fmt: skip
    return stats.tmax_s
