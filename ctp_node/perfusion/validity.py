"""Per-map validity masks: for each voxel and map (CBF, CBV, MTT, Tmax), whether the data support the value.

A map has a number in every voxel; some of those numbers are not measurements. Three reasons, each
decided from the physics of indicator dilution and the noise measured on the study itself (nothing
is fitted to a test set):

1. **No measurable enhancement** (every map invalid). A voxel's maps mean something only where
   its curve enhances above noise. The statistic is the area under the raw concentration curve (the
   quantity CBV is made of, linear in the data) pooled over the connected region of similar voxels
   the voxel belongs to, against the noise that pooled area would have without any enhancement:
   ``sd = sigma * |a| * sqrt(min(1, A_c / n))`` with ``sigma`` the per-frame noise measured on the
   baseline (``denoise.estimate_noise``), ``a`` the weights of each acquired frame in the area
   (resampling to the grid and the baseline subtraction included), ``n`` the region's voxels and
   ``A_c`` the noise's in-plane correlation area (measured on the same noise image). A region
   enhances when ``area / sd >= Z_MIN`` (3: a flat region passes with probability 0.13 %).
   Why regions and not single voxels: an ischaemic core enhances by 1-3 HU (CBV 0.4-0.7 mL/100 g
   against 3-4 in grey matter), below the noise of any one voxel at 6-10 HU and even of a 4 mm
   neighbourhood (measured on the family-A phantom: 40-90 % of core voxels below 3 sigma), but far
   above the noise of the whole core (tens of sigma). Regions: the 3D connected components of the
   low-flow candidates (rCBF below the core threshold, after the masks' majority vote) and of the
   rest of the analysed tissue, so a non-enhancing region never borrows the enhancement of normal
   tissue around it. A flat region that touches a true core joins it (they cannot be told apart at
   this noise: both are near zero flow).
2. **Truncated outflow** (CBV and MTT invalid). The area ratio CBV = k area(C) / area(AIF) over the
   acquisition misses the part of the tissue's response to the arterial input that comes after the
   last frame. With the voxel's delay d (Tmax) and transit time MTT, the fraction of the response
   inside the window is ``sum_s AIF(s) (1 - exp(-(T - s - d) / MTT)) / sum_s AIF(s)`` (exponential
   residue: the heaviest tail of the residue families the fit uses, so this bounds the loss from
   above). Where more than ``MAX_MISSING_AREA`` (10 %, the CBV accuracy the analysis is held to) is
   missing, CBV and MTT are flagged. CBF is not: the core is a relative flow threshold and a
   truncated, slow, delayed voxel is exactly what a core is made of; its CBF (CBV / MTT in the
   default analysis) inherits the truncation, which the CBV flag states.
3. **Residue peak not resolved** (Tmax invalid). Tmax places the tissue's bolus relative to the
   arterial one; it needs the tissue's first-pass peak (no earlier than the AIF's peak + Tmax) to be
   followed by ``PEAK_FRAMES_AFTER`` acquired frames (a downslope, at the sampling interval of the
   acquisition), and the fitted delay to lie inside the range the fit can represent. Such a Tmax is a
   lower bound: it still counts for "Tmax > 6 s".

Outside the analysed tissue (CSF, vessels, outside the brain) no value is claimed valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from ctp_node.perfusion import timing

Z_MIN = 3.0
MAX_MISSING_AREA = 0.10
PEAK_FRAMES_AFTER = 2
ROUNDING_NOISE_HU = 1.0 / np.sqrt(12.0)  # the noise floor of integer-stored HU
NOISE_BOX_MM = 6.0  # box over which the noise's correlation area is measured: several correlation lengths
MAP_NAMES = ("cbf", "cbv", "mtt", "tmax")
CHUNK = 65536


@dataclass
class MapValidity:
    """(Z, Y, X) bool masks: True where the map's value is supported by the data."""

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    enhancing: np.ndarray  # measurable enhancement (reason 1)
    truncated: np.ndarray  # outflow cut off by the end of the acquisition (reason 2), within enhancing tissue
    tmax_unresolved: np.ndarray  # residue peak beyond the window / fit range (reason 3), within enhancing tissue

    def masks(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in MAP_NAMES}

    def summary(self, tissue: np.ndarray) -> dict:
        """Invalid fraction of the analysed tissue per map and per reason (JSON-ready)."""
        n = max(int(tissue.sum()), 1)
        invalid = {name: round(float((tissue & ~mask).sum()) / n, 4) for name, mask in self.masks().items()}
        return {
            "tissue_voxels": int(tissue.sum()),
            "invalid_fraction": invalid,
            "reasons_fraction": {
                "no_measurable_enhancement": round(float((tissue & ~self.enhancing).sum()) / n, 4),
                "truncated_outflow": round(float(self.truncated.sum()) / n, 4),
                "tmax_peak_not_resolved": round(float(self.tmax_unresolved.sum()) / n, 4),
            },
            "criteria": {
                "enhancement_z_min": Z_MIN, "max_missing_area_fraction": MAX_MISSING_AREA,
                "frames_after_tissue_peak": PEAK_FRAMES_AFTER,
            },
        }  # fmt: skip

    def note(self, tissue: np.ndarray) -> str:
        fractions = self.summary(tissue)["invalid_fraction"]
        shown = ", ".join(f"{name.upper()} {100 * value:.1f} %" for name, value in fractions.items())
        return f"invalid (no value the data support) in the analysed tissue: {shown}"


def area_weights(times_s: np.ndarray, grid_s: np.ndarray, baseline_frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, a): weight of each acquired frame in the sum over the uniform grid of S, and in that sum of S - S0
    (S0 the mean of the baseline frames): the noise of the area is sigma * |a| for frame-wise white noise."""
    w = timing.interpolation_matrix(times_s, grid_s).sum(axis=0)
    a = w.copy()
    if len(baseline_frames):
        a[np.asarray(baseline_frames)] -= w.sum() / len(baseline_frames)
    return w, a


def raw_area(hu: np.ndarray, baseline: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(Z, Y, X) float32 area of S - S0 on the grid, one frame at a time (no copy of the series)."""
    out = np.zeros(hu.shape[1:], dtype=np.float32)
    for frame, weight in zip(hu, weights):
        if weight:
            out += np.float32(weight) * frame
    out -= np.float32(weights.sum()) * baseline.astype(np.float32)
    return out


def correlation_area(noise_image: np.ndarray, mask: np.ndarray, pixel_mm: float) -> float:
    """In-plane correlation area of the noise (voxels): var(box mean) * box voxels / var, from a box
    several correlation lengths wide, over boxes lying wholly inside ``mask``; 1 when none does."""
    size = max(3, 2 * int(round(NOISE_BOX_MM / pixel_mm / 2)) + 1)
    inside = ndimage.uniform_filter(mask.astype(np.float32), (1, size, size), mode="constant") > 0.999
    values = noise_image[mask]
    if inside.sum() < 100 or values.size < 100:
        return 1.0
    var = float(np.var(values))
    box = ndimage.uniform_filter(np.where(mask, noise_image, np.float32(0)), (1, size, size), mode="constant")
    if var <= 0:
        return 1.0
    return float(max(1.0, np.var(box[inside]) * size * size / var))


def enhancing_regions(
    area: np.ndarray,
    tissue: np.ndarray,
    low_flow: np.ndarray,
    sigma_hu: float,
    weight_norm: float,
    corr_area: float,
    z_min: float = Z_MIN,
) -> np.ndarray:
    """Voxels of ``tissue`` whose region (3D component of low-flow or of other tissue) enhances above noise."""
    out = np.zeros(tissue.shape, dtype=bool)
    # A noise-free series still has the rounding of its stored integers: 1 / sqrt(12) HU per frame.
    sigma_hu = max(float(sigma_hu), ROUNDING_NOISE_HU)
    structure = np.ones((3, 3, 3), dtype=bool)
    for part in (tissue & low_flow, tissue & ~low_flow):
        labels, n = ndimage.label(part, structure=structure)
        if n == 0:
            continue
        flat = labels.reshape(-1)
        counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
        sums = np.bincount(flat, weights=area.reshape(-1).astype(np.float64), minlength=n + 1)
        counts[0] = 1.0
        mean = sums / counts
        sd = sigma_hu * weight_norm * np.sqrt(np.minimum(1.0, corr_area / counts))
        keep = mean / sd >= z_min
        keep[0] = False
        out |= keep[labels]
    return out


def missing_area_fraction(
    aif_grid: np.ndarray,
    grid_s: np.ndarray,
    mtt: np.ndarray,
    tmax: np.ndarray,
    where: np.ndarray,
    shape: float = 1.0,
) -> np.ndarray:
    """(Z, Y, X) float32: share of the area ratio's response cut off by the end of the grid (see module doc).

    ``shape``: the gamma residue's (1, the default, is the exponential: the heaviest tail the fit
    uses, an upper bound; inf is the box)."""
    out = np.zeros(mtt.shape, dtype=np.float32)
    aif = np.maximum(np.asarray(aif_grid, dtype=np.float64), 0.0)
    total = aif.sum()
    index = np.flatnonzero(where)
    if total <= 0 or index.size == 0:
        return out
    remaining = float(grid_s[-1]) - np.asarray(grid_s, dtype=np.float64)  # (N,) time left after each input
    m_all, d_all = mtt.reshape(-1)[index], tmax.reshape(-1)[index]
    values = np.empty(index.size, dtype=np.float32)
    for start in range(0, index.size, CHUNK):
        m = np.maximum(m_all[start : start + CHUNK].astype(np.float64), 1e-3)[:, None]
        d = np.maximum(d_all[start : start + CHUNK].astype(np.float64), 0.0)[:, None]
        tail = unseen_share(np.clip(remaining[None, :] - d, 0.0, None), m, shape)  # of each input's response
        values[start : start + CHUNK] = (tail @ aif) / total
    out.reshape(-1)[index] = values
    return out


def unseen_share(seen_s: np.ndarray, mtt_s: np.ndarray, shape: float) -> np.ndarray:
    """1 - (integral of R over [0, seen_s]) / MTT for a gamma transit-time residue of ``shape``: the
    share of a unit input's response (area MTT) that falls after ``seen_s`` seconds."""
    x = np.asarray(seen_s, dtype=np.float64)
    m = np.asarray(mtt_s, dtype=np.float64)
    if np.isinf(shape):
        return 1.0 - np.minimum(x, m) / m
    if shape == 1.0:
        return np.exp(-x / m)
    z = x * shape / m
    # integral_0^x Q(a, a t / m) dt = x Q(a, a x / m) + m P(a + 1, a x / m)
    return np.clip(1.0 - (x / m) * special.gammaincc(shape, z) - special.gammainc(shape + 1.0, z), 0.0, 1.0)


def tmax_unresolved(
    tmax: np.ndarray, aif_peak_s: float, acquired_s: np.ndarray, max_tmax_s: float | None, where: np.ndarray
) -> np.ndarray:
    """Voxels of ``where`` whose tissue peak (>= AIF peak + Tmax) has fewer than ``PEAK_FRAMES_AFTER``
    acquired frames after it, or whose Tmax sits at the end of the range the fit can represent."""
    acquired = np.sort(np.asarray(acquired_s, dtype=np.float64))
    peak = aif_peak_s + np.maximum(tmax, 0.0)
    after = acquired.size - np.searchsorted(acquired, peak, side="right")
    bad = after < PEAK_FRAMES_AFTER
    if max_tmax_s is not None:
        bad |= tmax >= max_tmax_s
    return where & bad


def assess(
    *,
    hu: np.ndarray,
    baseline: np.ndarray,
    times_s: np.ndarray,
    grid_s: np.ndarray,
    baseline_frames: np.ndarray,
    tissue: np.ndarray,
    low_flow: np.ndarray,
    noise_sigma_hu: float,
    noise_image: np.ndarray,
    pixel_mm: float,
    aif_grid: np.ndarray,
    mtt: np.ndarray,
    tmax: np.ndarray,
    max_tmax_s: float | None,
) -> MapValidity:
    """The validity masks of one analysis (see the module doc for the criteria)."""
    w, a = area_weights(times_s, grid_s, baseline_frames)
    area = raw_area(hu, baseline, w)
    corr = correlation_area(noise_image, tissue, pixel_mm)
    enhancing = enhancing_regions(area, tissue, low_flow, noise_sigma_hu, float(np.linalg.norm(a)), corr)
    truncated = enhancing & (missing_area_fraction(aif_grid, grid_s, mtt, tmax, enhancing) > MAX_MISSING_AREA)
    aif_peak_s = float(grid_s[int(np.argmax(aif_grid))])
    unresolved = tmax_unresolved(tmax, aif_peak_s, times_s, max_tmax_s, enhancing)
    return MapValidity(
        cbf=enhancing.copy(), cbv=enhancing & ~truncated, mtt=enhancing & ~truncated, tmax=enhancing & ~unresolved,
        enhancing=enhancing, truncated=truncated, tmax_unresolved=unresolved,
    )  # fmt: skip


def all_valid(tissue: np.ndarray) -> MapValidity:
    """Every tissue voxel valid (the masks switched off)."""
    none = np.zeros(tissue.shape, dtype=bool)
    return MapValidity(
        cbf=tissue.copy(), cbv=tissue.copy(), mtt=tissue.copy(), tmax=tissue.copy(), enhancing=tissue.copy(),
        truncated=none, tmax_unresolved=none.copy(),
    )  # fmt: skip
