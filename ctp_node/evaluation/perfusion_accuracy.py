"""The accuracy targets of ``ctp-node perfusion`` on a phantom study: maps against the phantom's truth.

Needs the phantom's tissue labels (normally perfused grey and white matter, the lesion core), so it
lives with the evaluation; the comparison itself is ``ctp_node.perfusion.compare``.
"""

from __future__ import annotations

import numpy as np

from ctp_node.perfusion.compare import region_median_error
from ctp_node.phantom.tissue import TissueLabel


def accuracy(maps, study, truth_masks) -> dict[str, float]:
    """The accuracy targets' numbers for ``maps`` (``PerfusionMaps``) of a phantom ``study``.

    ``truth_masks``: ``perfusion.lesion.convention_masks`` of the true maps (same voxel size).
    Volumes in mL; ``*_rel`` are relative errors of the region medians; ``tmax_normal_s`` is the
    median |Tmax - true delay| in normally perfused grey and white matter, ``tmax_wm_s`` and
    ``tmax_penumbra_s`` the median of Tmax less the true Tmax (signed, s) over normal white matter
    and in the penumbra (hypoperfused tissue outside the core; NaN where the study has none).

    Two more numbers explain the core CBF error (not targets): ``cbf_core_voxel_rel``, the median
    over core voxels of each voxel's CBF / true CBF, less 1 (the bias of the estimate itself), and
    ``cbf_core_truth_skew``, the true core CBF's mean / median, less 1. Where the truth is skewed (a
    soft-edged core: most voxels near the core value, a rim rising towards the penumbra's), voxel
    noise alone moves the region median towards the mean, with no bias in any voxel.
    """
    truth = study.truth
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    normal = np.isin(truth.labels, (TissueLabel.GREY_MATTER, TissueLabel.WHITE_MATTER))
    wm = truth.labels == TissueLabel.WHITE_MATTER
    gm = truth.labels == TissueLabel.GREY_MATTER
    core = truth.core_mask
    penumbra = np.isin(truth.labels, (TissueLabel.GM_PENUMBRA, TissueLabel.WM_PENUMBRA)) & ~core
    return {
        "core_ml": float(maps.core_mask.sum()) * voxel_ml,
        "core_true_ml": float(truth_masks.core.sum()) * voxel_ml,
        "tmax6_ml": float(maps.hypoperfusion_mask.sum()) * voxel_ml,
        "tmax6_true_ml": float(truth_masks.hypoperfusion.sum()) * voxel_ml,
        "reference_cbf": float(maps.reference_cbf),
        "reference_cbf_true": float(truth_masks.reference_cbf),
        "cbf_wm_rel": region_median_error(maps.cbf, truth.cbf, wm),
        "cbv_wm_rel": region_median_error(maps.cbv, truth.cbv, wm),
        "cbf_gm_rel": region_median_error(maps.cbf, truth.cbf, gm),
        "cbv_gm_rel": region_median_error(maps.cbv, truth.cbv, gm),
        "cbf_core_rel": region_median_error(maps.cbf, truth.cbf, core),
        "cbv_core_rel": region_median_error(maps.cbv, truth.cbv, core),
        "tmax_normal_s": float(np.median(np.abs(maps.tmax[normal] - truth.tmax[normal]))),
        "tmax_wm_s": _median_difference(maps.tmax, truth.tmax, wm),
        "tmax_penumbra_s": _median_difference(maps.tmax, truth.tmax, penumbra),
        "cbf_core_voxel_rel": _voxel_median_ratio(maps.cbf, truth.cbf, core) - 1.0,
        "cbf_core_truth_skew": _mean_over_median(truth.cbf, core) - 1.0,
    }


def _voxel_median_ratio(candidate: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    use = region & (reference > 0)
    return float(np.median(candidate[use] / reference[use])) if use.any() else float("nan")


def _mean_over_median(values: np.ndarray, region: np.ndarray) -> float:
    inside = values[region]
    return float(inside.mean() / np.median(inside)) if inside.size and np.median(inside) > 0 else float("nan")


def _median_difference(candidate: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    return float(np.median(candidate[region] - reference[region])) if region.any() else float("nan")
