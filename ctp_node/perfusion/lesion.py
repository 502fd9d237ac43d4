"""Core, hypoperfusion and their volumes, by the usual CTP conventions.

Rules (stated once, here):
- Analysed tissue: brain voxels that are neither CSF (baseline below ``csf_max_hu``) nor vessel
  (CBV above ``vessel_cbv``); CSF has no perfusion and vessels have arterial-like curves, so both
  would otherwise show up as "core" or random Tmax.
- Normal (unaffected) tissue: analysed tissue outside the hypoperfused region (Tmax <= 6 s). Its
  median CBF is the reference for relative CBF (rCBF). The median of the whole unaffected brain
  mixes grey and white matter; it needs no midline and works for bilateral disease, where a
  contralateral mirror would not.
- Core: rCBF < 0.3 within the hypoperfused region (Tmax > 6 s). Requiring a perfusion delay keeps
  low-flow partial-volume voxels next to CSF out of the core; set ``core_within_hypoperfusion``
  False for the plain rCBF rule.
- Each thresholded mask is cleaned by a 3 x 3 in-plane majority vote among tissue voxels: single
  noisy voxels are not lesions, and clinical packages clean their masks likewise.
- Hypoperfusion: Tmax > 6 s; severe hypoperfusion: Tmax > 10 s;
  hypoperfusion intensity ratio (HIR) = volume(Tmax > 10 s) / volume(Tmax > 6 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CORE_RCBF = 0.3
HYPOPERFUSION_TMAX_S = 6.0
SEVERE_TMAX_S = 10.0
VESSEL_CBV = 8.0  # mL/100 g: above this a voxel is mostly vessel (normal grey matter is 3-5)


@dataclass(frozen=True)
class LesionMasks:
    tissue: np.ndarray
    core: np.ndarray
    hypoperfusion: np.ndarray
    severe: np.ndarray
    reference_cbf: float  # mL/100 g/min, median CBF of unaffected tissue


def tissue_mask(brain: np.ndarray, baseline_hu: np.ndarray, cbv: np.ndarray, csf_max_hu: float) -> np.ndarray:
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


def lesion_masks(
    tissue: np.ndarray,
    cbf: np.ndarray,
    tmax: np.ndarray,
    core_rcbf: float = CORE_RCBF,
    hypoperfusion_tmax_s: float = HYPOPERFUSION_TMAX_S,
    severe_tmax_s: float = SEVERE_TMAX_S,
    core_within_hypoperfusion: bool = True,
    majority_size: int = 3,
) -> LesionMasks:
    hypo = majority(tmax > hypoperfusion_tmax_s, tissue, majority_size)
    normal = tissue & ~hypo
    reference = float(np.median(cbf[normal])) if normal.any() else float("nan")
    low_flow = cbf < core_rcbf * reference if np.isfinite(reference) else np.zeros_like(tissue)
    core = majority(low_flow, tissue, majority_size)
    if core_within_hypoperfusion:
        core &= hypo
    severe = majority(tmax > severe_tmax_s, tissue, majority_size)
    return LesionMasks(tissue=tissue, core=core, hypoperfusion=hypo, severe=severe, reference_cbf=reference)


def hypoperfusion_intensity_ratio(masks: LesionMasks) -> float | None:
    """volume(Tmax > 10 s) / volume(Tmax > 6 s); None when there is no hypoperfusion at all."""
    n_hypo = int(masks.hypoperfusion.sum())
    return None if n_hypo == 0 else int(masks.severe.sum()) / n_hypo
