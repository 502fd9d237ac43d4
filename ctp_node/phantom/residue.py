"""Residue functions and the tissue enhancement curves they produce with the AIF.

Indicator-dilution theory: ``C(t) = CBF * (AIF conv R_d)(t)`` with ``R_d(t) = R(t - d)`` for
t >= d (bolus delay d) and 0 before. Both residues have R(0) = 1 and integral(R) = MTT, so the truth
is exact: CBV = CBF * MTT / 60 and Tmax (time of the maximum of R_d) = d.

Per-voxel parameters are quantised to ``PARAMETER_STEP_S`` so that a small table of curves, one per
distinct (MTT, delay) pair, serves millions of voxels; the quantised values are the ones used and
the ones reported in the truth maps.
"""

from __future__ import annotations

import numpy as np

FINE_STEP_S = 0.01  # convolution grid; 1/5 of PARAMETER_STEP_S so delays fall on grid points
PARAMETER_STEP_S = 0.05  # quantum of per-voxel MTT and delay


def residue(t: np.ndarray, mtt_s: float, kind: str) -> np.ndarray:
    """R(t) for t >= 0: ``exp(-t / MTT)`` ("exponential") or ``1 for t < MTT`` ("box")."""
    t = np.asarray(t, dtype=np.float64)
    if kind == "exponential":
        return np.exp(-t / mtt_s)
    if kind == "box":
        # Half weight at the jump: the trapezoid rule then integrates the box exactly.
        return np.where(t < mtt_s - 1e-9, 1.0, np.where(np.abs(t - mtt_s) <= 1e-9, 0.5, 0.0))
    raise ValueError(f"unknown residue {kind!r}; use 'exponential' or 'box'")


def convolved_curves(aif_fine: np.ndarray, mtts_s: np.ndarray, kind: str) -> np.ndarray:
    """``(AIF conv R)(t)`` (HU s) on the fine grid for each MTT: shape (len(mtts_s), aif_fine.size).

    Trapezoid rule on the ``FINE_STEP_S`` grid (R's first sample carries half weight).
    """
    n = aif_fine.size
    t = np.arange(n) * FINE_STEP_S
    kernels = np.stack([residue(t, float(m), kind) for m in mtts_s])
    kernels[:, 0] *= 0.5
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(aif_fine, size)[None, :] * np.fft.rfft(kernels, size, axis=1)
    return np.fft.irfft(spectrum, size, axis=1)[:, :n] * FINE_STEP_S


def curve_table(
    aif_fine: np.ndarray,
    times_s: np.ndarray,
    mtt_steps: np.ndarray,
    delay_steps: np.ndarray,
    kind: str,
) -> np.ndarray:
    """``(AIF conv R_delay)(times_s)`` for each (MTT, delay) pair given in ``PARAMETER_STEP_S`` units.

    Returns float64 (len(mtt_steps), len(times_s)); multiply by CBF / 6000 / k for HU.
    """
    unique_mtt, mtt_index = np.unique(mtt_steps, return_inverse=True)
    per_mtt = convolved_curves(aif_fine, unique_mtt * PARAMETER_STEP_S, kind)
    ratio = int(round(PARAMETER_STEP_S / FINE_STEP_S))
    fine_index = np.rint(np.asarray(times_s) / FINE_STEP_S).astype(np.int64)[None, :] - (
        np.asarray(delay_steps, dtype=np.int64)[:, None] * ratio
    )
    if fine_index.max() >= aif_fine.size:
        raise ValueError("the AIF grid does not reach the last time point")
    values = per_mtt[mtt_index[:, None], np.clip(fine_index, 0, None)]
    return np.where(fine_index >= 0, values, 0.0)
