"""Perfusion maps against reference (e.g. true) maps: median disagreement per map, region statistics.

``median_disagreement`` is the summary used to compare analyses and series (synthetic seconds,
interpolation, the acquired 1 s series) against the maps of a noise-free truth: for CBF, CBV and
MTT the median relative difference ``|c - r| / r``, for Tmax the median absolute difference in
seconds, over the voxels of a region where the reference is defined (r > 0 for the relative maps).
The accuracy targets of ``ctp-node perfusion`` on a phantom study, which need the phantom's tissue
labels, are ``ctp_node.evaluation.perfusion_accuracy.accuracy``.
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
