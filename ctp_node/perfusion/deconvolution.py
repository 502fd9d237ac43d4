"""Deconvolution of tissue curves by the AIF: block-circulant truncated SVD and oscillation-index SVD.

Model (Ostergaard 1996): ``C(t_i) = dt * sum_j AIF(t_j) * K(t_i - t_j)`` with ``K = F * R``, F the flow
in 1/s and R the residue function (R(0) = 1). With the AIF zero-padded to L >= 2N samples and the
matrix made circulant (Wu 2003), a tissue bolus arriving later than the AIF no longer falls off the
end of the matrix: the estimate is insensitive to delay, which then shows up as a shift of K.

A circulant matrix is diagonalised by the DFT and its singular values are ``dt * |FFT(aif)|``; the
truncated-SVD pseudo-inverse is therefore exactly a Fourier filter that keeps the frequencies whose
``|FFT(aif)|`` reaches ``threshold * max|FFT(aif)|``. That is what is computed here, voxel-vectorised
with real FFTs, instead of an explicit L x L SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft

BSVD_THRESHOLD = 0.1  # of the largest singular value (Wu 2003)
OSVD_INDEX = 0.095  # oscillation index bound (Wu 2003)
OSVD_THRESHOLDS = (0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4)
CHUNK_VOXELS = 32768  # bounds memory: chunk * n_fft * 4 bytes per intermediate array


@dataclass(frozen=True)
class ResidueStats:
    """Per-voxel summary of the flow-scaled residue K = F * R."""

    flow: np.ndarray  # (V,) max K, 1/s
    tmax_s: np.ndarray  # (V,) time of max K (sub-sample), s; negative: tissue before AIF
    offset_hu: np.ndarray | None = None  # (V,) baseline offset re-estimated by the fit (parametric)
    residue_shape: float | None = None  # the study's gamma shape, when the fit chose one (parametric)
    first_tmax_s: np.ndarray | None = None  # (V,) the first pass's delay, which placed the baseline (parametric)


def fft_length(n: int) -> int:
    return fft.next_fast_len(2 * n, real=True)


def residue_filter(aif: np.ndarray, step_s: float, threshold: float, n_fft: int) -> np.ndarray:
    """Fourier-domain truncated pseudo-inverse of the block-circulant AIF matrix."""
    spectrum = fft.rfft(np.asarray(aif, dtype=np.float64), n=n_fft)
    magnitude = np.abs(spectrum)
    keep = magnitude >= threshold * magnitude.max()
    inverse = np.zeros_like(spectrum)
    inverse[keep] = np.conj(spectrum[keep]) / (magnitude[keep] ** 2 * step_s)
    return inverse.astype(np.complex64)


def residues(conc: np.ndarray, aif: np.ndarray, step_s: float, threshold: float = BSVD_THRESHOLD) -> np.ndarray:
    """K = F * R (V, L) for (V, N) curves: the bSVD solution, whole (for inspection and tests)."""
    n_fft = fft_length(conc.shape[-1])
    spec = fft.rfft(np.asarray(conc, dtype=np.float32), n=n_fft, axis=-1)
    return fft.irfft(spec * residue_filter(aif, step_s, threshold, n_fft), n=n_fft, axis=-1)


def _peak(k: np.ndarray, n: int, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum of each row and its time, refined by a parabola through the three samples at the peak."""
    n_fft = k.shape[1]
    rows = np.arange(k.shape[0])
    m = np.argmax(k, axis=1)
    y0 = k[rows, (m - 1) % n_fft].astype(np.float64)
    y1 = k[rows, m].astype(np.float64)
    y2 = k[rows, (m + 1) % n_fft].astype(np.float64)
    curvature = y0 - 2.0 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (y0 - y2) / curvature, 0.0)
    offset = np.clip(offset, -0.5, 0.5)
    peak = y1 - 0.25 * (y0 - y2) * offset
    # Samples past 1.5 N are the circular wrap of a tissue curve that leads the AIF.
    index = np.where(m >= n + n // 2, m - n_fft, m) + offset
    return peak, index * step_s


def oscillation_index(k: np.ndarray) -> np.ndarray:
    """Wu 2003: O = 1/(L f_max) * sum_k |f(k) - 2 f(k-1) + f(k-2)| over the whole residue."""
    second = np.abs(np.diff(k, n=2, axis=1)).sum(axis=1)
    f_max = np.maximum(k.max(axis=1), 1e-12)
    return second / (k.shape[1] * f_max)


def deconvolve_bsvd(
    conc: np.ndarray,
    aif: np.ndarray,
    step_s: float,
    threshold: float = BSVD_THRESHOLD,
    chunk: int = CHUNK_VOXELS,
) -> ResidueStats:
    """Block-circulant truncated SVD with one threshold for all voxels."""
    n = conc.shape[1]
    n_fft = fft_length(n)
    inverse = residue_filter(aif, step_s, threshold, n_fft)
    flow = np.empty(conc.shape[0], dtype=np.float64)
    tmax = np.empty(conc.shape[0], dtype=np.float64)
    for start in range(0, conc.shape[0], chunk):
        part = slice(start, start + chunk)
        spec = fft.rfft(np.asarray(conc[part], dtype=np.float32), n=n_fft, axis=1)
        k = fft.irfft(spec * inverse, n=n_fft, axis=1)
        flow[part], tmax[part] = _peak(k, n, step_s)
    return ResidueStats(flow=flow, tmax_s=tmax)


def deconvolve_osvd(
    conc: np.ndarray,
    aif: np.ndarray,
    step_s: float,
    oscillation_bound: float = OSVD_INDEX,
    thresholds: tuple[float, ...] = OSVD_THRESHOLDS,
    chunk: int = CHUNK_VOXELS,
) -> ResidueStats:
    """Oscillation-index SVD: per voxel the lowest threshold whose residue oscillates less than the bound.

    Lower thresholds keep more high frequencies (sharper, higher K peaks, less CBF underestimation)
    but amplify noise; the oscillation index picks the compromise voxel by voxel. Voxels that never
    meet the bound get the highest threshold.
    """
    n = conc.shape[1]
    n_fft = fft_length(n)
    levels = sorted(thresholds)
    filters = [residue_filter(aif, step_s, t, n_fft) for t in levels]
    flow = np.empty(conc.shape[0], dtype=np.float64)
    tmax = np.empty(conc.shape[0], dtype=np.float64)
    for start in range(0, conc.shape[0], chunk):
        part = np.arange(start, min(start + chunk, conc.shape[0]))
        spec = fft.rfft(np.asarray(conc[part], dtype=np.float32), n=n_fft, axis=1)
        todo = np.ones(part.size, dtype=bool)
        for i, inverse in enumerate(filters):
            rows = np.flatnonzero(todo)
            k = fft.irfft(spec[rows] * inverse, n=n_fft, axis=1)
            last = i == len(filters) - 1
            ok = np.ones(rows.size, bool) if last else oscillation_index(k) <= oscillation_bound
            flow[part[rows[ok]]], tmax[part[rows[ok]]] = _peak(k[ok], n, step_s)
            todo[rows[ok]] = False
            if not todo.any():
                break
    return ResidueStats(flow=flow, tmax_s=tmax)
