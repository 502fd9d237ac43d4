"""Analytic indicator-dilution curves and a tiny synthetic head, independent of ctp_node.phantom."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FINE_S = 0.01  # step of the "continuous" reference convolution


def gamma_aif(t: np.ndarray, t0: float = 8.0, alpha: float = 3.0, beta: float = 1.5, peak: float = 400.0):
    """Gamma variate bolus (HU above baseline) with its maximum ``peak`` at t0 + alpha * beta."""
    s = np.clip(np.asarray(t, dtype=np.float64) - t0, 0.0, None)
    return peak * (s / (alpha * beta)) ** alpha * np.exp(alpha - s / beta)


def residue(t: np.ndarray, mtt: float, kind: str) -> np.ndarray:
    """R(t) with R(0) = 1 and integral MTT: exponential or box."""
    if kind == "exp":
        return np.exp(-t / mtt)
    if kind == "box":
        return (t < mtt).astype(np.float64)
    raise ValueError(kind)


def tissue_curve(times_s: np.ndarray, cbf: float, mtt: float, delay_s: float, kind: str, aif=gamma_aif) -> np.ndarray:
    """C(t) = CBF/6000 * (AIF conv R(. - delay))(t), convolved on a 0.01 s grid, sampled at times_s."""
    fine = np.arange(0.0, float(np.max(times_s)) + 1.0, FINE_S)
    r = np.where(fine >= delay_s, residue(np.clip(fine - delay_s, 0, None), mtt, kind), 0.0)
    c = cbf / 6000.0 * np.convolve(aif(fine), r)[: fine.size] * FINE_S
    return np.interp(times_s, fine, c)


def synthetic_head(times_s: np.ndarray, noise_hu: float = 0.0, seed: int = 0, size: int = 48):
    """(T, 2, size, size) HU: skull ring, brain with a normal left and a delayed, low-flow right half,
    a 3 x 3 artery in the middle. Returns (hu, truth dict of per-class (cbf, mtt, delay) and masks)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    skull = (r >= 0.40 * size) & (r < 0.46 * size)
    brain = r < 0.40 * size
    right = brain & (xx >= size // 2 + 2)
    artery = (abs(yy - size // 2) <= 1) & (abs(xx - size // 2) <= 1)
    normal = brain & ~right & ~artery
    classes = {"normal": (50.0, 4.0, 1.0), "lesion": (8.0, 10.0, 8.0)}
    hu = np.full((times_s.size, 2, size, size), -1000.0)
    hu[:, :, skull] = 900.0
    hu[:, :, brain] = 32.0
    hu[:, :, artery] = 40.0 + gamma_aif(times_s)[:, None, None]
    for name, region in (("normal", normal), ("lesion", right)):
        cbf, mtt, delay = classes[name]
        hu[:, :, region] += tissue_curve(times_s, cbf, mtt, delay, "exp")[:, None, None]
    rng = np.random.default_rng(seed)
    hu += noise_hu * rng.standard_normal(hu.shape)
    truth = {"classes": classes, "normal": normal, "lesion": right, "artery": artery, "brain": brain}
    return hu.astype(np.float32), truth


def interior(region: np.ndarray, slices: int) -> np.ndarray:
    """(slices, Y, X) bool: a (Y, X) region of ``synthetic_head`` less its 3-voxel rim (the filters' edges)."""
    return np.stack([ndimage.binary_erosion(region, iterations=3)] * slices)


HEAD_TIMES_S = np.arange(0.0, 60.0, 1.0)  # 1 s sampling for a minute, as the node's default acquisition
HEAD_VOXEL_ML = 0.005


def head_maps(hu: np.ndarray, **settings):
    """``compute_perfusion`` (parametric) of a ``synthetic_head`` series at ``HEAD_TIMES_S`` and 1 mm pixels,
    with ``settings`` (``PerfusionSettings`` fields) changed from the defaults."""
    from ctp_node.perfusion import PerfusionSettings, compute_perfusion

    config = PerfusionSettings(pixel_mm=1.0, **settings)
    return compute_perfusion(hu, HEAD_TIMES_S, HEAD_VOXEL_ML, method="parametric", settings=config)
