"""Acquisition times: validation, the uniform analysis grid and bolus arrival.

Deconvolution needs curves on a uniform grid. Scanners often sample non-uniformly (1 s early,
2-5 s later), so every curve is resampled to a fine uniform grid by *linear interpolation* between
the acquired frames; no information is added, the grid only makes the discrete convolution model
valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.errors import NoAIFError, PerfusionError

EARLIEST_WINDOW_S = 2.0
BASELINE_MARGIN_S = 1.0  # baseline frames end this long before the extrapolated foot of the bolus
# Float32 interpolation a * (1 - f) + b * f is exact to a few ulps; noise of 1 HU is 100 times more.
INTERPOLATION_RTOL = 2e-6
INTERPOLATION_ATOL_HU = 1e-3
COHERENT_FRACTION = 0.5  # the vessels' mean curve keeps at least this share of their own range
MIN_FRAMES = 6  # one baseline frame, an upslope, a peak and a washout need at least this many


def validate_series(hu: np.ndarray, times_s: np.ndarray, min_frames: int = MIN_FRAMES) -> np.ndarray:
    """Check a (T, Z, Y, X) series against its acquisition times; return the times as float64."""
    hu = np.asarray(hu)
    times = np.asarray(times_s, dtype=np.float64)
    if hu.ndim != 4:
        raise PerfusionError(
            f"expected a 4D HU array (T, Z, Y, X), got shape {hu.shape}; "
            "a single slice must still carry a Z axis of length 1"
        )
    if times.ndim != 1 or times.shape[0] != hu.shape[0]:
        raise PerfusionError(
            f"times_s has {times.size} values but the series has {hu.shape[0]} frames: "
            "pass one acquisition time (s) per volume, in frame order"
        )
    if hu.shape[0] < min_frames:
        raise PerfusionError(
            f"perfusion analysis needs at least {min_frames} frames (baseline, upslope, peak, washout); "
            f"got {hu.shape[0]}"
        )
    if not np.all(np.isfinite(times)):
        raise PerfusionError("times_s contains NaN or inf: every frame needs a finite acquisition time")
    steps = np.diff(times)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        raise PerfusionError(
            f"acquisition times must increase strictly, but frame {i} is at {times[i]:g} s and frame "
            f"{i + 1} at {times[i + 1]:g} s: sort the volumes by time and drop duplicates"
        )
    return times


def interpolated_frames(hu: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """(T,) bool: interior frames that are, in every voxel, the linear interpolation in time of the
    frames before and after them (up to float32 rounding), and not a copy of them.

    A series acquired every few seconds and linearly interpolated to 1 s carries its information in
    the acquired frames only; the interpolated ones repeat their noise, correlated over seconds. The
    analysis models the noise as independent per frame (baseline, TIPS filter), so such frames are
    dropped and the acquired ones analysed at their own times (the curves are resampled to the
    uniform grid anyway, which gives the same straight lines back). A constant run (a noise-free
    baseline) is kept: there is nothing to gain from dropping it. Values rounded to integers (e.g.
    stored as DICOM) hide the interpolation and are analysed as they are.
    """
    times = np.asarray(times_s, dtype=np.float64)
    n = times.size
    out = np.zeros(n, dtype=bool)
    if n < 3:
        return out
    frames = hu.reshape(n, -1)
    sample = frames[:, :: max(1, frames.shape[1] // 4096)]  # cheap screen before the full check
    for i in range(1, n - 1):
        f = np.float32((times[i] - times[i - 1]) / (times[i + 1] - times[i - 1]))
        for data in (sample, frames):
            before = data[i - 1].astype(np.float32, copy=False)
            after = data[i + 1].astype(np.float32, copy=False)
            line = before + f * (after - before)
            tolerance = np.float32(INTERPOLATION_RTOL) * (np.abs(before) + np.abs(after)) + np.float32(
                INTERPOLATION_ATOL_HU
            )
            collinear = bool(np.all(np.abs(data[i] - line) <= tolerance))
            moving = bool(np.any(np.abs(after - before) > tolerance))
            if not (collinear and moving):
                break
        else:
            out[i] = True
    return out


def default_grid_step(times_s: np.ndarray) -> float:
    """The analysis step: the shortest sampling interval, but never coarser than 1 s.

    1 s keeps sparse (4-8 s) series on the same grid as the 1 s series they are compared with;
    intervals below 0.25 s (timing jitter) would only make the analysis slower.
    """
    shortest = float(np.min(np.diff(times_s)))
    return float(np.clip(shortest, 0.25, 1.0))


def uniform_grid(times_s: np.ndarray, step_s: float) -> np.ndarray:
    """Uniform times from the first to the last acquisition (the last point may fall short of it)."""
    if step_s <= 0:
        raise PerfusionError(f"the analysis grid step must be positive, got {step_s}")
    n = int(np.floor((times_s[-1] - times_s[0]) / step_s + 1e-6)) + 1
    return times_s[0] + step_s * np.arange(n)


def interpolation_matrix(times_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Matrix M (len(grid), len(times)) with ``curve_on_grid = M @ curve`` (linear interpolation)."""
    idx = np.clip(np.searchsorted(times_s, grid_s, side="right") - 1, 0, len(times_s) - 2)
    w = (grid_s - times_s[idx]) / (times_s[idx + 1] - times_s[idx])
    w = np.clip(w, 0.0, 1.0)
    m = np.zeros((grid_s.size, times_s.size), dtype=np.float64)
    rows = np.arange(grid_s.size)
    m[rows, idx] = 1.0 - w
    m[rows, idx + 1] += w
    return m


@dataclass(frozen=True)
class BolusArrival:
    """When the contrast arrives, and which frames are clean pre-contrast baseline."""

    frame: int  # first frame above 10 % of the arterial peak enhancement
    time_s: float  # foot of the arterial upslope (extrapolated), s
    baseline_frames: np.ndarray  # indices of the frames averaged into S0


def detect_bolus_arrival(
    hu: np.ndarray,
    times_s: np.ndarray,
    candidates: np.ndarray,
    fraction: float = 0.1,
) -> BolusArrival:
    """Arrival of the bolus in the most strongly enhancing (arterial) voxels.

    Vessels are the voxels enhancing by at least 30 % of the strongest; the mean curve of those
    peaking first (within 2 s of the earliest 5 %, i.e. arteries) is taken, and the bolus has
    crossed at the first frame where it exceeds ``fraction`` of its peak enhancement. The arrival
    time is the foot of the upslope (extrapolated to zero enhancement); baseline frames end 1 s
    before it, or, with sparse sampling, are all frames before the crossing.
    """
    flat = hu.reshape(hu.shape[0], -1)[:, candidates.reshape(-1)]
    if flat.shape[1] == 0:
        raise PerfusionError("no soft-tissue voxels to detect the bolus in: is this a head CT in HU?")
    # Rank by temporal range, not by rise over frame 0: a series that starts inside the bolus
    # must still pick its vessels, so that the missing baseline is noticed below.
    enhancement = flat.max(axis=0) - flat.min(axis=0)
    strong = np.flatnonzero(enhancement >= 0.3 * np.percentile(enhancement, 99.9))
    if strong.size < 10:
        strong = np.argsort(enhancement)[-10:]
    # Veins and distal arteries can enhance as strongly but peak later: keep the earliest ones.
    ttp = times_s[np.argmax(flat[:, strong], axis=0)]
    earliest = strong[ttp <= np.percentile(ttp, 5) + EARLIEST_WINDOW_S]
    curve = flat[:, earliest].astype(np.float64).mean(axis=1)
    rise = curve - curve[0]
    peak = rise.max()
    # Noise alone gives every voxel a range of several sigma, but at random frames: the mean curve of
    # the "strongest" voxels then stays flat. A bolus enhances them together.
    coherent = curve.max() - curve.min() >= COHERENT_FRACTION * float(np.median(enhancement[earliest]))
    if peak <= 0 or curve.max() - curve.min() < 1.0 or not coherent:
        raise NoAIFError(
            "no contrast enhancement anywhere in the series, so no arterial input function: is this a "
            "contrast perfusion study, and does it cover the bolus?"
        )
    if curve[0] - curve.min() > fraction * (curve.max() - curve.min()):
        raise PerfusionError(
            "the bolus is already present in the first frame, so there is no pre-contrast baseline: "
            "the series must start before the contrast arrives"
        )
    frame = int(np.flatnonzero(rise > fraction * peak)[0])
    foot = _foot(times_s, rise, frame)
    baseline = np.flatnonzero(times_s < foot - BASELINE_MARGIN_S)
    if baseline.size == 0:
        baseline = np.arange(frame)  # sparse sampling: every frame before the crossing
    return BolusArrival(frame=frame, time_s=foot, baseline_frames=baseline)


def _foot(times_s: np.ndarray, rise: np.ndarray, frame: int) -> float:
    """Where the upslope, extrapolated from the first two frames above the threshold, meets zero.

    The foot of a gamma-variate bolus starts a few seconds before the curve crosses 10 % of its peak;
    frames on the foot are not baseline.
    """
    if frame + 1 < rise.size and rise[frame + 1] > rise[frame]:
        slope = (rise[frame + 1] - rise[frame]) / (times_s[frame + 1] - times_s[frame])
        return float(max(times_s[frame] - rise[frame] / slope, times_s[frame - 1]))
    return float(times_s[frame - 1])
