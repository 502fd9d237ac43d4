"""Core, hypoperfusion and their volumes, by the usual CTP conventions.

Rules (stated once, here):
- Analysed tissue: brain voxels that are neither CSF (baseline below ``csf_max_hu``) nor vessel
  (CBV above ``vessel_cbv``); CSF has no perfusion and vessels have arterial-like curves, so both
  would otherwise show up as "core" or random Tmax.
- Reference for relative CBF (rCBF): the median CBF of *normally perfused* tissue, i.e. analysed
  tissue with Tmax below ``normal_tmax_s`` (2 s) in the hemisphere contralateral to the
  hypoperfusion (the half of the brain, split at its centre column, with fewer Tmax > 6 s voxels),
  as clinical packages do. Falls back to normally perfused tissue of the whole brain, then to all
  tissue outside the hypoperfusion, when too little is left (bilateral disease, small coverage).
- Core: rCBF < 0.3 (set ``core_within_hypoperfusion`` to also require Tmax > 6 s).
- Hypoperfusion: Tmax > 6 s; severe hypoperfusion: Tmax > 10 s;
  hypoperfusion intensity ratio (HIR) = volume(Tmax > 10 s) / volume(Tmax > 6 s).
- Each thresholded mask is cleaned: a 3 x 3 in-plane majority vote among tissue voxels (single noisy
  voxels are not lesions, pinholes are filled), then connected components (3D) smaller than
  ``min_cluster_ml`` (1 mL) are dropped when the voxel size is known. Clinical packages clean their
  masks likewise; 1 mL is several times the blob size the noise filter leaves (~0.25 mL) and far
  below the volumes decisions are made on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CORE_RCBF = 0.3
HYPOPERFUSION_TMAX_S = 6.0
SEVERE_TMAX_S = 10.0
NORMAL_TMAX_S = 2.0
MIN_CLUSTER_ML = 1.0
VESSEL_CBV = 8.0  # mL/100 g: above this a voxel is mostly vessel (normal grey matter is 3-5)
MIN_REFERENCE_FRACTION = 0.05  # of the tissue: fewer normal voxels than this -> a wider reference


@dataclass(frozen=True)
class LesionMasks:
    tissue: np.ndarray
    core: np.ndarray
    hypoperfusion: np.ndarray
    severe: np.ndarray
    reference_cbf: float  # mL/100 g/min, median CBF of normally perfused tissue
    reference: np.ndarray | None = None  # the voxels it came from


def parenchyma_mask(brain: np.ndarray, baseline_hu: np.ndarray, cbv: np.ndarray, csf_max_hu: float) -> np.ndarray:
    """Brain voxels that are perfused tissue: not CSF (baseline above ``csf_max_hu``), not vessel (CBV).

    (``model.window.tissue_mask`` is another thing: the published inference mask of skull-stripped data.)
    """
    return brain & (baseline_hu > csf_max_hu) & (cbv < VESSEL_CBV)


def majority(mask: np.ndarray, tissue: np.ndarray, size: int) -> np.ndarray:
    """In-plane ``size`` x ``size`` majority vote among tissue voxels: removes isolated noise voxels
    and fills pinholes without letting CSF or vessel voxels vote."""
    if size <= 1:
        return mask & tissue
    window = (1, size, size)
    votes = ndimage.uniform_filter((mask & tissue).astype(np.float32), window, mode="constant")
    voters = ndimage.uniform_filter(tissue.astype(np.float32), window, mode="constant")
    return tissue & (votes > 0.5 * voters)


def drop_small_clusters(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its 3D connected components (26-connected) of fewer than ``min_voxels``."""
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def min_cluster_voxels(voxel_volume_ml: float | None, min_cluster_ml: float = MIN_CLUSTER_ML) -> int:
    """The smallest component a cleaned mask keeps, in voxels (1 without a voxel size)."""
    return 1 if voxel_volume_ml is None else int(np.ceil(min_cluster_ml / voxel_volume_ml))


def clean_mask(mask: np.ndarray, voters: np.ndarray, majority_size: int, min_voxels: int) -> np.ndarray:
    """A thresholded mask as every lesion mask is cleaned: the majority vote among ``voters``, then components
    of fewer than ``min_voxels`` dropped."""
    return drop_small_clusters(majority(mask, voters, majority_size), min_voxels)


def hemispheres(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(left, right) column masks (X,) of the two halves of the tissue, split at its mean column; None
    without tissue. The one split of the brain used for the rCBF reference and the mirror check."""
    columns = np.nonzero(tissue)[-1]
    if columns.size == 0:
        return None
    left = np.arange(tissue.shape[-1]) < float(np.mean(columns))
    return left, ~left


def reference_region(tissue: np.ndarray, tmax: np.ndarray, hypo: np.ndarray, normal_tmax_s: float) -> np.ndarray:
    """Normally perfused tissue of the less affected hemisphere (``hemispheres``)."""
    normal = tissue & (tmax < normal_tmax_s)
    halves = hemispheres(tissue)
    if halves is None:
        return normal
    affected = [int(hypo[..., h].sum()) for h in halves]
    side = np.zeros(tissue.shape, dtype=bool)
    side[..., halves[int(np.argmin(affected))]] = True
    minimum = MIN_REFERENCE_FRACTION * tissue.sum()
    for candidate in (normal & side, normal, tissue & ~hypo):
        if candidate.sum() >= max(minimum, 1):
            return candidate
    return tissue


def lesion_masks(
    tissue: np.ndarray,
    cbf: np.ndarray,
    tmax: np.ndarray,
    core_rcbf: float = CORE_RCBF,
    hypoperfusion_tmax_s: float = HYPOPERFUSION_TMAX_S,
    severe_tmax_s: float = SEVERE_TMAX_S,
    core_within_hypoperfusion: bool = False,
    majority_size: int = 3,
    voxel_volume_ml: float | None = None,
    min_cluster_ml: float = MIN_CLUSTER_ML,
    normal_tmax_s: float = NORMAL_TMAX_S,
    measurable: np.ndarray | None = None,
    reference_cbf: float | None = None,
) -> LesionMasks:
    """The lesion masks (module doc). ``measurable`` (Z, Y, X) bool: tissue whose curve enhances measurably
    (``validity``); the rest neither counts nor votes in any mask, nor in the reference, so a flat curve
    is never core (its CBF of about 0 is not a measurement). None: all tissue. ``reference_cbf``: the rCBF
    reference to use (the reference voxels are still reported); None: their median CBF."""
    min_voxels = min_cluster_voxels(voxel_volume_ml, min_cluster_ml)
    voters = tissue if measurable is None else tissue & measurable

    def clean(mask: np.ndarray) -> np.ndarray:
        return clean_mask(mask, voters, majority_size, min_voxels)

    hypo = clean(tmax > hypoperfusion_tmax_s)
    reference_voxels = reference_region(voters, tmax, hypo, normal_tmax_s)
    if reference_cbf is not None:
        reference = float(reference_cbf)
    else:
        reference = float(np.median(cbf[reference_voxels])) if reference_voxels.any() else float("nan")
    low_flow = cbf < core_rcbf * reference if np.isfinite(reference) else np.zeros_like(tissue)
    core = clean(low_flow & hypo if core_within_hypoperfusion else low_flow)
    severe = clean(tmax > severe_tmax_s)
    return LesionMasks(
        tissue=tissue, core=core, hypoperfusion=hypo, severe=severe, reference_cbf=reference,
        reference=reference_voxels,
    )  # fmt: skip


def convention_masks(cbf: np.ndarray, tmax: np.ndarray, tissue: np.ndarray, voxel_volume_ml: float | None = None):
    """The conventions applied to given (e.g. true) maps: what a perfect analysis would report."""
    return lesion_masks(tissue, cbf, tmax, voxel_volume_ml=voxel_volume_ml)


# DEFUSE 3 imaging criteria (Albers et al., NEJM 2018): the trial's mismatch profile.
DEFUSE3_CORE_ML = 70.0  # core below
DEFUSE3_RATIO = 1.8  # Tmax > 6 s volume / core volume at least
DEFUSE3_MISMATCH_ML = 15.0  # Tmax > 6 s volume - core volume at least


def defuse3_mismatch(core_ml: float | None, tmax6_ml: float | None) -> bool | None:
    """Whether the volumes meet the DEFUSE 3 target mismatch (core < 70 mL, ratio >= 1.8, mismatch >= 15
    mL); None when either volume is unknown. A core of 0 with 15 mL or more of Tmax > 6 s qualifies."""
    if core_ml is None or tmax6_ml is None:
        return None
    ratio_ok = core_ml <= 0 or tmax6_ml / core_ml >= DEFUSE3_RATIO
    return core_ml < DEFUSE3_CORE_ML and ratio_ok and tmax6_ml - core_ml >= DEFUSE3_MISMATCH_ML


def hypoperfusion_intensity_ratio(masks: LesionMasks) -> float | None:
    """volume(Tmax > 10 s) / volume(Tmax > 6 s); None when there is no hypoperfusion at all."""
    n_hypo = int(masks.hypoperfusion.sum())
    return None if n_hypo == 0 else int(masks.severe.sum()) / n_hypo
