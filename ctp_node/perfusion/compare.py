"""Perfusion maps against reference (e.g. true) maps: median disagreement per map, region statistics.

``median_disagreement`` is the summary used to compare analyses and series (synthetic seconds,
interpolation, the acquired 1 s series) against the maps of a noise-free truth: for CBF, CBV and
MTT the median relative difference ``|c - r| / r``, for Tmax the median absolute difference in
seconds, over the voxels of a region where the reference is defined (r > 0 for the relative maps).
``accuracy`` gives the numbers of the accuracy targets of ``ctp-node perfusion`` on a phantom study.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

RELATIVE_MAPS = ("cbf", "cbv", "mtt")
MAPS = (*RELATIVE_MAPS, "tmax")


class HasMaps(Protocol):
    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray


def median_disagreement(candidate: HasMaps, reference: HasMaps, region: np.ndarray) -> dict[str, float]:
    """``{"cbf", "cbv", "mtt"}``: median |c - r| / r (fraction, voxels with r > 0); ``"tmax"``: median
    |c - r| in s; all over ``region`` (Z, Y, X) bool, e.g. the phantom's ``truth.parenchyma_mask``.

    Works with ``PerfusionMaps``, ``PerfusionTruth`` or anything with the four (Z, Y, X) maps. NaN
    for a map when the region holds no usable voxel.
    """
    region = np.asarray(region, dtype=bool)
    out: dict[str, float] = {}
    for name in MAPS:
        c = np.asarray(getattr(candidate, name), dtype=np.float64)
        r = np.asarray(getattr(reference, name), dtype=np.float64)
        if c.shape != r.shape or r.shape != region.shape:
            raise ValueError(f"{name}: candidate {c.shape}, reference {r.shape} and region {region.shape} differ")
        if name in RELATIVE_MAPS:
            use = region & (r > 0)
            values = np.abs(c[use] - r[use]) / r[use]
        else:
            values = np.abs(c[region] - r[region])
        out[name] = float(np.median(values)) if values.size else float("nan")
    return out


def region_median_error(candidate: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    """(median of candidate - median of reference) / median of reference, over ``region``."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return float("nan")
    ref = float(np.median(reference[region]))
    return (float(np.median(candidate[region])) - ref) / ref if ref != 0 else float("nan")


def accuracy(maps, study, truth_masks) -> dict[str, float]:
    """The accuracy targets' numbers for ``maps`` (``PerfusionMaps``) of a phantom ``study``.

    ``truth_masks``: ``perfusion.lesion.convention_masks`` of the true maps (same voxel size).
    Volumes in mL; ``*_rel`` are relative errors of the region medians; ``tmax_normal_s`` is the
    median |Tmax - true delay| in normally perfused grey and white matter.
    """
    from ctp_node.phantom.tissue import TissueLabel

    truth = study.truth
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    normal = np.isin(truth.labels, (TissueLabel.GREY_MATTER, TissueLabel.WHITE_MATTER))
    wm = truth.labels == TissueLabel.WHITE_MATTER
    core = truth.core_mask
    return {
        "core_ml": float(maps.core_mask.sum()) * voxel_ml,
        "core_true_ml": float(truth_masks.core.sum()) * voxel_ml,
        "tmax6_ml": float(maps.hypoperfusion_mask.sum()) * voxel_ml,
        "tmax6_true_ml": float(truth_masks.hypoperfusion.sum()) * voxel_ml,
        "reference_cbf": float(maps.reference_cbf),
        "reference_cbf_true": float(truth_masks.reference_cbf),
        "cbf_wm_rel": region_median_error(maps.cbf, truth.cbf, wm),
        "cbv_wm_rel": region_median_error(maps.cbv, truth.cbv, wm),
        "cbf_core_rel": region_median_error(maps.cbf, truth.cbf, core),
        "cbv_core_rel": region_median_error(maps.cbv, truth.cbv, core),
        "tmax_normal_s": float(np.median(np.abs(maps.tmax[normal] - truth.tmax[normal]))),
    }
