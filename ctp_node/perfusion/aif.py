"""Automatic arterial input function (AIF) and venous output function (VOF) selection.

Arterial curves are early, high, narrow and smooth. Each candidate is scored
``peak / ((TTP - arrival + 1 s) * FWHM)`` (Rempp-type score): partial-volume arterial voxels have
the same shape but a lower peak and lose; veins (sagittal sinus) can be as high as arteries in CT but
peak several seconds later and wider, and lose too. Among the best-scored curves, those peaking more
than ``max_ttp_spread_s`` after the earliest one (venous mixing) and unusually rough ones (noise,
motion) are dropped; the AIF is the mean of the survivors.
"""

from __future__ import annotations

import numpy as np

from ctp_node.perfusion.errors import NoAIFError

MIN_AIF_PEAK_HU = 50.0  # arteries enhance by hundreds of HU; tissue by 3-20 HU
N_CANDIDATES = 400
RISE_WINDOW_S = 3.0  # arteries cross half their peak within this of the earliest; veins 4+ s later


def curve_shape(curves: np.ndarray, grid_s: np.ndarray) -> dict[str, np.ndarray]:
    """Peak, time to peak, FWHM and roughness of (n, N) curves on a uniform grid."""
    step = grid_s[1] - grid_s[0]
    peak = curves.max(axis=1)
    ttp = grid_s[np.argmax(curves, axis=1)]
    fwhm = (curves >= 0.5 * peak[:, None]).sum(axis=1) * step
    second = np.diff(curves, n=2, axis=1)
    roughness = np.sqrt((second**2).mean(axis=1)) / np.maximum(peak, 1e-6)
    area = curves.sum(axis=1) * step
    return {"peak": peak, "ttp": ttp, "fwhm": fwhm, "roughness": roughness, "area": area}


def candidate_voxels(
    peak_enhancement: np.ndarray,
    brain: np.ndarray,
    min_peak_hu: float = MIN_AIF_PEAK_HU,
    n_candidates: int = N_CANDIDATES,
) -> np.ndarray:
    """Flat indices of the most strongly enhancing brain voxels: only these can be arterial or venous.

    ``peak_enhancement`` (Z, Y, X) is max over time of S - S0 of the *unsmoothed* series, so that
    vessel voxels keep their full height.
    """
    flat_brain = np.flatnonzero(brain)
    peaks = peak_enhancement.reshape(-1)[flat_brain]
    if peaks.size == 0 or peaks.max() < min_peak_hu:
        strongest = float(peaks.max()) if peaks.size else 0.0
        raise NoAIFError(
            f"no arterial input function found: the strongest enhancement in the brain is "
            f"{strongest:.0f} HU, below the {min_peak_hu:.0f} HU expected of an artery. Check that the "
            "series is a contrast perfusion study covering the bolus, give the artery with aif_mask "
            "(--aif-mask), or lower the minimum AIF peak for windowed data"
        )
    high = np.flatnonzero(peaks >= min_peak_hu)
    high = high[np.argsort(peaks[high])[::-1][:n_candidates]]
    return flat_brain[high]


def select_aif(
    curves: np.ndarray,
    grid_s: np.ndarray,
    arrival_s: float,
    n_voxels: int = 12,
    max_ttp_spread_s: float = 2.0,
) -> np.ndarray:
    """Rows of ``curves`` (n, N), candidate enhancement curves on the uniform ``grid_s``, for the AIF."""
    shape = curve_shape(curves, grid_s)
    # Curves that end near their peak are not arterial (tissue, saturated or venous pooling).
    returns = curves[:, -1] < 0.6 * shape["peak"]
    smooth = shape["roughness"] <= 2.0 * np.median(shape["roughness"])
    keep = returns & smooth
    # Veins rise seconds after arteries. At 4-8 s sampling the arterial peak falls between two
    # acquisitions while the broader venous one is hit, so the venous curves score higher and peak
    # at the same sample: only their upslope, which crosses half its peak later, tells them apart.
    if keep.any():
        rise = _half_rise_time(curves, grid_s, shape["peak"])
        keep &= rise <= np.percentile(rise[keep], 5) + RISE_WINDOW_S
    if not keep.any():
        raise NoAIFError(
            "no arterial input function found: every high-enhancing curve is either noisy or does not "
            "wash out before the end of the series; give the artery with aif_mask (--aif-mask)"
        )
    step = grid_s[1] - grid_s[0]
    delay = np.maximum(shape["ttp"] - arrival_s, 0.0) + 1.0
    score = np.where(keep, shape["peak"] / (delay * np.maximum(shape["fwhm"], step)), -np.inf)
    order = np.argsort(score)[::-1][: min(n_voxels, int(keep.sum()))]
    early = shape["ttp"][order] <= shape["ttp"][order].min() + max_ttp_spread_s
    return order[early]


def _half_rise_time(curves: np.ndarray, grid_s: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """When each (n, N) curve first crosses half its peak, linearly interpolated between grid points
    (half the peak: far above noise for vessel curves, unlike the foot)."""
    above = curves >= 0.5 * peak[:, None]
    first = np.argmax(above, axis=1)
    before = np.maximum(first - 1, 0)
    rows = np.arange(curves.shape[0])
    low, high = curves[rows, before], curves[rows, first]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(high > low, (0.5 * peak - low) / (high - low), 1.0)
    step = grid_s[1] - grid_s[0]
    return grid_s[before] + np.where(first > 0, np.clip(fraction, 0.0, 1.0), 0.0) * step


def select_vof(
    curves: np.ndarray,
    grid_s: np.ndarray,
    aif_ttp_s: float,
    n_voxels: int = 12,
    min_delay_s: float = 2.0,
) -> np.ndarray | None:
    """Venous output voxels: the largest-area curves peaking at least ``min_delay_s`` after the AIF.

    Large veins suffer little partial volume, so their area is the reference the AIF area is scaled
    to (the indicator that goes in must come out). ``curves`` are the candidate curves (n, N) on
    ``grid_s``; returns row indices, or None if nothing qualifies.
    """
    shape = curve_shape(curves, grid_s)
    late = np.flatnonzero(shape["ttp"] >= aif_ttp_s + min_delay_s)
    if late.size == 0:
        return None
    return late[np.argsort(shape["area"][late])[::-1][:n_voxels]]
