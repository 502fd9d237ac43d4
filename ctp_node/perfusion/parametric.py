"""Model-based deconvolution: fit ``C(t) = F * (AIF conv R_{MTT, d})(t)`` per voxel over a dictionary.

Truncated SVD smooths the residue: with a broad AIF (first pass ~9 s wide plus recirculation) it
lowers CBF by half and moves Tmax seconds late (see tests/perfusion/test_phantom.py). A physiological
residue model with three parameters (flow F, mean transit time MTT, delay d) has no such bias when
the residue family is right, and is robust to noise because it fits three numbers, not a curve
(the approach of model-based perfusion estimation, e.g. Mouridsen et al., NeuroImage 2006).

The fit is an exhaustive search over a dictionary of (MTT, delay) pairs: each atom is the AIF,
linearly interpolated onto a fine grid, convolved with the residue and sampled at the acquisition
times themselves (so non-uniform sampling needs no resampling of the tissue curves). For each voxel
the atom with the largest positive projection wins and F is its least-squares amplitude. Voxel-
vectorised as one matrix product per chunk.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import special

from ctp_node.perfusion.deconvolution import ResidueStats
from ctp_node.perfusion.timing import BASELINE_MARGIN_S, interpolation_matrix

ResidueFamily = Literal["exponential", "box", "gamma"]
MTT_GRID_S = np.geomspace(1.0, 30.0, 40)  # ~9 % steps
DELAY_GRID_S = np.arange(0.0, 15.001, 0.25)
# "gamma": transit times gamma-distributed (capillary transit-time heterogeneity, Mouridsen et al.,
# JCBFM 2014), R(t) = 1 - GammaCDF(t; a, MTT / a); a = 1 is the exponential, a -> inf the box residue.
# The fit picks the shape too, so it is unbiased across the residue families in use. Coarser MTT and
# delay grids keep the dictionary small; the delay is refined by a parabola through the fit quality.
GAMMA_SHAPES = (1.0, 2.0, 4.0, np.inf)
GAMMA_MTT_GRID_S = np.geomspace(1.0, 30.0, 24)  # ~15 % steps
# The delay grid starts below 0: tissue can lead the chosen AIF by a fraction of a second (the AIF
# voxel lies downstream, the sampling phase, or a discretely convolved simulation such as the OSIPI
# DSC test data, whose tissue curves lead continuous-time physics by half a frame). Without negative
# atoms such a curve is fitted with too short an MTT and CBF = CBV / MTT comes out 50 % high
# (tests/perfusion/test_osipi_dsc.py). The reported Tmax is clipped at 0.
GAMMA_DELAY_GRID_S = np.arange(-0.5, 15.001, 0.5)
FINE_STEP_S = 0.05
OFFSET_CHUNK = 32768
CHUNK_VOXELS = 256  # the (chunk, atoms) projection stays in cache: ~2x faster than large chunks


def _residue(t: np.ndarray, mtt_s: float, family: ResidueFamily, shape: float = 1.0) -> np.ndarray:
    if family == "exponential":
        return np.exp(-t / mtt_s)
    if family == "box" or (family == "gamma" and np.isinf(shape)):
        return (t < mtt_s).astype(np.float64)
    if family == "gamma":
        return special.gammaincc(shape, t * shape / mtt_s)
    raise ValueError(f"unknown residue family {family!r}: use 'exponential', 'box' or 'gamma'")


def dictionary(
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily = "exponential",
    mtt_grid_s: np.ndarray | None = None,
    delay_grid_s: np.ndarray | None = None,
    acquired_s: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms (M, T) sampled at ``times_s`` (F = 1/s scale, HU), their MTT (M,) and delay (M,).

    Atoms are ordered (shape, MTT, delay), delay fastest. ``acquired_s``: when ``times_s`` is a grid
    the curves were linearly resampled to from these acquisition times, the atoms are sampled at them
    and resampled the same way. Otherwise, at 4-8 s sampling, a smooth atom never matches a
    piecewise-linear curve and the fit escapes to the shortest MTT and zero delay (the atom closest
    to the piecewise-linear AIF itself)."""
    gamma = family == "gamma"
    if mtt_grid_s is None:
        mtt_grid_s = GAMMA_MTT_GRID_S if gamma else MTT_GRID_S
    if delay_grid_s is None:
        delay_grid_s = GAMMA_DELAY_GRID_S if gamma else DELAY_GRID_S
    shapes = GAMMA_SHAPES if gamma else (1.0,)
    times = np.asarray(times_s, dtype=np.float64) - float(times_s[0])
    fine = np.arange(0.0, times[-1] + FINE_STEP_S, FINE_STEP_S)
    aif_fine = np.interp(fine, times, np.asarray(aif, dtype=np.float64))
    n = fine.size
    size = 1 << int(np.ceil(np.log2(2 * n)))
    aif_spec = np.fft.rfft(aif_fine, size)
    kernels = np.stack([_residue(fine, float(m), family, a) for a in shapes for m in mtt_grid_s])
    kernels[:, 0] *= 0.5  # trapezoid rule
    conv = np.fft.irfft(aif_spec[None, :] * np.fft.rfft(kernels, size, axis=1), size, axis=1)[:, :n] * FINE_STEP_S
    sample = np.rint(times / FINE_STEP_S).astype(np.int64)
    shifts = np.rint(np.asarray(delay_grid_s) / FINE_STEP_S).astype(np.int64)
    index = sample[None, :] - shifts[:, None]  # (D, T)
    atoms = np.where(index[None] >= 0, conv[:, np.clip(index, 0, n - 1)], 0.0)  # (shape x MTT, D, T)
    mtts = np.tile(np.asarray(mtt_grid_s, dtype=np.float64), len(shapes))
    mtt = np.repeat(mtts, len(delay_grid_s))
    delay = np.tile(np.asarray(delay_grid_s, dtype=np.float64), mtts.size)
    atoms = atoms.reshape(-1, times.size)
    if acquired_s is not None:
        grid = np.asarray(times_s, dtype=np.float64)
        acquired = np.asarray(acquired_s, dtype=np.float64)
        if acquired.size != grid.size or not np.allclose(acquired, grid):
            resample = interpolation_matrix(acquired, grid) @ interpolation_matrix(grid, acquired)  # (T, T)
            atoms = atoms @ resample.T
    return atoms, mtt, delay


def deconvolve_parametric(
    conc: np.ndarray,
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily = "exponential",
    chunk: int = CHUNK_VOXELS,
    basis: np.ndarray | None = None,
    arrival_s: float | None = None,
    acquired_s: np.ndarray | None = None,
) -> tuple[ResidueStats, np.ndarray]:
    """Flow (1/s) and Tmax (= delay, s) per voxel for (V, T) curves at ``times_s``; also the fitted MTT.

    ``basis`` (K, T) orthonormal rows: the curves lie in its span (e.g. after ``denoise``), so the
    projections are computed on K coefficients instead of T samples (same numbers, faster). The
    delay is refined between grid points by a parabola through the projections of the best atom's
    delay neighbours.

    ``arrival_s`` (time of the AIF's foot, same clock as ``times_s``): a second pass. The baseline
    offset of each curve is re-estimated from every frame before its fitted bolus arrival (frames
    before ``arrival_s + delay - BASELINE_MARGIN_S``), not only from the frames before the AIF:
    delayed tissue has more clean baseline frames, and a wrong offset is the largest error of
    low-flow curves. The curves, less that offset, are fitted again; ``stats.offset_hu`` returns it.
    The offset is fixed from the first pass's delay rather than fitted with each atom, so the atom
    choice cannot exploit noise in it. ``acquired_s``: the acquisition times when ``times_s`` is a
    finer grid resampled from them; a grid frame then counts as baseline only up to the last
    acquisition before the limit (later grid frames are interpolated towards the enhanced one).
    """
    first, fitted_mtt = _fit(conc, times_s, aif, family, chunk, basis, acquired_s)
    if arrival_s is None:
        return first, fitted_mtt
    t = np.asarray(times_s, dtype=np.float64)
    data = np.asarray(conc, dtype=np.float32)
    offset = np.zeros(data.shape[0], dtype=np.float32)
    for start in range(0, data.shape[0], OFFSET_CHUNK):
        part = slice(start, start + OFFSET_CHUNK)
        limit = arrival_s + first.tmax_s[part] - BASELINE_MARGIN_S
        if acquired_s is not None:
            acquired = np.asarray(acquired_s, dtype=np.float64)
            before = np.searchsorted(acquired, limit, side="left") - 1  # last acquisition < limit
            limit = np.where(before >= 0, acquired[np.maximum(before, 0)] + 1e-6, -np.inf)
        pre = t[None, :] < limit[:, None]
        count = pre.sum(axis=1)
        sums = np.where(pre, data[part], 0.0).sum(axis=1)
        offset[part] = np.where(count > 0, sums / np.maximum(count, 1), 0.0)
    second, fitted_mtt = _fit(data - offset[:, None], times_s, aif, family, chunk, basis, acquired_s)
    return ResidueStats(flow=second.flow, tmax_s=second.tmax_s, offset_hu=offset.astype(np.float64)), fitted_mtt


def _fit(
    conc: np.ndarray,
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily,
    chunk: int,
    basis: np.ndarray | None,
    acquired_s: np.ndarray | None = None,
) -> tuple[ResidueStats, np.ndarray]:
    """One pass of the dictionary fit (see ``deconvolve_parametric``)."""
    atoms, mtt, delay = dictionary(times_s, aif, family, acquired_s=acquired_s)
    n_delays = int(np.flatnonzero(np.diff(delay) < 0)[0]) + 1 if np.any(np.diff(delay) < 0) else delay.size
    delay_step = float(delay[1] - delay[0]) if n_delays > 1 else 0.0
    rows_mtt = mtt[::n_delays]  # one per (shape, MTT), the MTT grid repeated per shape
    n_mtts = int(np.flatnonzero(np.diff(rows_mtt) <= 0)[0]) + 1 if np.any(np.diff(rows_mtt) <= 0) else rows_mtt.size
    mtt_ratio = float(rows_mtt[1] / rows_mtt[0]) if n_mtts > 1 else 1.0
    norms = np.linalg.norm(atoms, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = (atoms / safe[:, None]).astype(np.float32)
    data = np.asarray(conc, dtype=np.float32)
    if basis is not None:
        basis = np.asarray(basis, dtype=np.float32)
        unit = unit @ basis.T  # (M, K)
    flow = np.zeros(conc.shape[0], dtype=np.float64)
    tmax = np.zeros(conc.shape[0], dtype=np.float64)
    fitted_mtt = np.zeros(conc.shape[0], dtype=np.float64)
    for start in range(0, conc.shape[0], chunk):
        part = slice(start, start + chunk)
        block = data[part] if basis is None else data[part] @ basis.T
        projection = block @ unit.T  # (v, M)
        rows = np.arange(projection.shape[0])
        best = np.argmax(projection, axis=1)
        amplitude = projection[rows, best].astype(np.float64)
        positive = (amplitude > 0) & (norms[best] > 0)
        j = best % n_delays
        left = np.where(j > 0, projection[rows, best - (j > 0)], amplitude).astype(np.float64)
        right = np.where(j < n_delays - 1, projection[rows, best + (j < n_delays - 1)], amplitude).astype(np.float64)
        curvature = left - 2.0 * amplitude + right
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
        offset = np.clip(offset, -0.5, 0.5)
        flow[part] = np.where(positive, amplitude / norms[best], 0.0)
        tmax[part] = np.where(positive, np.maximum(delay[best] + offset * delay_step, 0.0), 0.0)
        # MTT refined the same way, along log MTT (the grid is geometric): without it the map takes
        # only the grid's values (~15 % steps), and a whole tissue class lands on one of them.
        k = (best // n_delays) % n_mtts
        lower = np.where(k > 0, projection[rows, best - n_delays * (k > 0)], amplitude).astype(np.float64)
        last = k < n_mtts - 1
        upper = np.where(last, projection[rows, best + n_delays * last], amplitude).astype(np.float64)
        curvature = lower - 2.0 * amplitude + upper
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(curvature < 0, 0.5 * (lower - upper) / curvature, 0.0)
        refined = mtt[best] * mtt_ratio ** np.clip(step, -0.5, 0.5)
        fitted_mtt[part] = np.where(positive, refined, 0.0)
    return ResidueStats(flow=flow, tmax_s=tmax), fitted_mtt
