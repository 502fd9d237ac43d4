"""Plan which seconds to synthesise and how each target is conditioned (the published rules).

Real acquisition times are rarely whole, uniform seconds. The rules here, in one place:

- Grid: whole seconds counted from the first acquired volume, ``t0 = times_s[0]``. An acquired
  volume at ``t`` lands on second ``floor(t - t0 + 0.5)`` (nearest second, halves round up), so the
  largest snapping error is 0.5 s; the plan reports the largest error actually made.
- Two acquired volumes on the same second (sampling faster than 1 s): the one nearer to the second
  is kept, the other is listed in ``superseded_inputs``, never dropped silently.
- Unusable volumes (motion-corrupted, marked by the caller): treated as missing and synthesised, as
  the paper proposes. Seconds before the first usable or after the last usable volume cannot be
  bracketed, so the output grid spans only the usable range (reported in ``notes``).
- Gaps longer than the trained maximum ``max_tr`` (8 s): the local context would leave [0, 1], so
  the model is not asked. ``long_gap="error"`` refuses the study (LongGapError names the gap);
  ``long_gap="linear"`` fills those seconds by linear interpolation and marks them in
  ``fallback_seconds``, separately from the model's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

PUBLISHED_MAX_TR = 8
LongGapPolicy = Literal["error", "linear"]
LONG_GAP_POLICIES: tuple[str, ...] = ("error", "linear")

SCENARIO_RISING, SCENARIO_PEAK, SCENARIO_FALLING = 0, 1, 2
SCENARIO_NAMES = ("rising", "around-peak", "falling")


class PlanError(ValueError):
    """The acquisition times cannot be planned as asked (say what and how to fix it)."""


class LongGapError(PlanError):
    """A gap between usable volumes is longer than the model was trained for."""


@dataclass(frozen=True)
class Target:
    """One synthetic second and the published conditioning for it."""

    second: int
    left: int
    right: int
    local_context: tuple[float, float]
    scenario: int

    @property
    def global_context(self) -> tuple[float, float, float]:
        one_hot = [0.0, 0.0, 0.0]
        one_hot[self.scenario] = 1.0
        return (one_hot[0], one_hot[1], one_hot[2])


@dataclass(frozen=True)
class InpaintPlan:
    """The 1 s grid of one sequence and what fills each second."""

    t0_s: float
    seconds: np.ndarray  # (T1,) whole seconds from t0 covered by the output, consecutive
    input_second: np.ndarray  # (N,) the second each input volume landed on; -1 if not used
    known_seconds: tuple[int, ...]  # seconds filled by an acquired volume
    targets: tuple[Target, ...]  # seconds the model synthesises
    fallback_seconds: tuple[int, ...]  # seconds filled by linear interpolation (long-gap policy)
    peak_second: int
    max_snap_error_s: float
    superseded_inputs: tuple[int, ...] = ()
    excluded_inputs: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def times_s(self) -> np.ndarray:
        """Absolute times of the output grid (same clock as the input times)."""
        return self.t0_s + self.seconds.astype(np.float64)

    def index(self, second: int) -> int:
        """Position of a grid second in the output sequence."""
        return int(second - self.seconds[0])


def snap_to_seconds(times_s: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest whole second from the first time (halves round up) and the signed error of each."""
    times = np.asarray(times_s, dtype=np.float64)
    rel = times - times[0]
    seconds = np.floor(rel + 0.5).astype(np.int64)
    return seconds, rel - seconds


def peak_second(frame_sums: dict[int, float], known_seconds: Sequence[int]) -> int:
    """The published inference rule for the bolus peak on the 1 s grid.

    Frames sit on the grid with zeros at unknown seconds; with 2 s sampling the argmax of the frame
    sums, otherwise the integer part of the mean of the two largest. For irregular sampling the gap
    that counts is the larger one next to the brightest frame.
    """
    known = sorted(known_seconds)
    if len(known) == 1:
        return known[0]
    ordered = sorted(known, key=lambda s: (-frame_sums[s], s))
    best = ordered[0]
    pos = known.index(best)
    neighbour_gaps = [known[pos] - known[pos - 1]] if pos > 0 else []
    if pos + 1 < len(known):
        neighbour_gaps.append(known[pos + 1] - known[pos])
    if max(neighbour_gaps) <= 2:
        return best
    return int((ordered[0] + ordered[1]) / 2)


def contrast_scenario(left: int, right: int, peak: int) -> int:
    """Rising if the pair lies before the peak, falling if after, otherwise around the peak."""
    if left < peak and right <= peak:
        return SCENARIO_RISING
    if left >= peak and right > peak:
        return SCENARIO_FALLING
    return SCENARIO_PEAK


def local_context(second: int, left: int, right: int, max_tr: int = PUBLISHED_MAX_TR) -> tuple[float, float]:
    """((t - l - 1) / (max_tr - 2), (r - t - 1) / (max_tr - 2))."""
    scale = float(max_tr - 2)
    return ((second - left - 1) / scale, (right - second - 1) / scale)


def plan_inpainting(
    times_s: Sequence[float] | np.ndarray,
    frame_sums: Sequence[float] | np.ndarray,
    *,
    usable: Sequence[bool] | np.ndarray | None = None,
    max_tr: int = PUBLISHED_MAX_TR,
    long_gap: LongGapPolicy = "error",
) -> InpaintPlan:
    """Plan every missing second of one sequence.

    ``times_s``: acquisition time of each input volume, increasing. ``frame_sums``: the sum of all
    voxel values of each input volume in the 0..80 window (the published peak statistic).
    ``usable``: False for volumes the caller marks as unusable (treated as missing).
    """
    times = np.asarray(times_s, dtype=np.float64)
    sums = np.asarray(frame_sums, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise PlanError("times_s must be a non-empty 1-D sequence of acquisition times in seconds")
    if sums.shape != times.shape:
        raise PlanError(f"got {times.size} times but {sums.size} frame sums: give one per volume")
    if not np.all(np.isfinite(times)):
        raise PlanError("times_s contains NaN or infinite values")
    if np.any(np.diff(times) <= 0):
        bad = int(np.argmax(np.diff(times) <= 0))
        raise PlanError(
            f"times_s must increase strictly: volume {bad + 1} at {times[bad + 1]:.3f} s does not follow "
            f"{times[bad]:.3f} s; sort the volumes by acquisition time"
        )
    if max_tr < 3:
        raise PlanError(f"max_tr must be >= 3 (the local context divides by max_tr - 2), got {max_tr}")
    if long_gap not in LONG_GAP_POLICIES:
        raise PlanError(f"unknown long-gap policy {long_gap!r}; choose one of {', '.join(LONG_GAP_POLICIES)}")
    usable_mask = np.ones(times.size, bool) if usable is None else np.asarray(usable, dtype=bool)
    if usable_mask.shape != times.shape:
        raise PlanError(f"got {times.size} times but {usable_mask.size} usable flags")

    seconds, errors = snap_to_seconds(times)
    notes: list[str] = []
    input_second = np.full(times.size, -1, dtype=np.int64)
    by_second: dict[int, int] = {}
    superseded: list[int] = []
    for i in np.flatnonzero(usable_mask):
        sec = int(seconds[i])
        other = by_second.get(sec)
        if other is None or abs(errors[i]) < abs(errors[other]):
            if other is not None:
                superseded.append(other)
            by_second[sec] = int(i)
        else:
            superseded.append(int(i))
    for sec, i in by_second.items():
        input_second[i] = sec
    if superseded:
        notes.append(
            f"volumes {sorted(superseded)} share a second with a volume nearer to it and are not used "
            "(sampling faster than 1 s)"
        )
    excluded = tuple(int(i) for i in np.flatnonzero(~usable_mask))
    if excluded:
        notes.append(f"volumes {list(excluded)} marked unusable: their seconds are synthesised")
    known = sorted(by_second)
    if len(known) < 2:
        raise PlanError(
            f"need at least two usable volumes to inpaint between, got {len(known)} "
            f"({times.size} volumes, {len(excluded)} marked unusable)"
        )
    first, last = known[0], known[-1]
    if first > 0 or last < int(seconds[-1]):
        notes.append(
            f"output covers seconds {first}..{last}: seconds outside the usable volumes cannot be "
            "bracketed and are not extrapolated"
        )

    used = errors[input_second >= 0]
    max_snap = float(np.max(np.abs(used))) if used.size else 0.0
    if max_snap > 1e-6:
        notes.append(f"acquisition times snapped to whole seconds, largest shift {max_snap:.3f} s")

    sum_by_second = {sec: float(sums[i]) for sec, i in by_second.items()}
    peak = peak_second(sum_by_second, known)

    targets: list[Target] = []
    fallback: list[int] = []
    long_gaps: list[tuple[int, int]] = []
    for left, right in zip(known[:-1], known[1:]):
        gap = right - left
        if gap > max_tr:
            long_gaps.append((left, right))
            fallback.extend(range(left + 1, right))
            continue
        scenario = contrast_scenario(left, right, peak)
        for sec in range(left + 1, right):
            targets.append(Target(sec, left, right, local_context(sec, left, right, max_tr), scenario))
    if long_gaps:
        described = ", ".join(f"{hi - lo} s between seconds {lo} and {hi}" for lo, hi in long_gaps)
        if long_gap == "error":
            raise LongGapError(
                f"gaps longer than the trained maximum of {max_tr} s: {described}. The model is not asked to "
                "extrapolate; choose the long-gap policy 'linear' to fill them by linear interpolation"
            )
        notes.append(f"long gaps filled by linear interpolation, not by the model: {described}")

    return InpaintPlan(
        t0_s=float(times[0]),
        seconds=np.arange(first, last + 1, dtype=np.int64),
        input_second=input_second,
        known_seconds=tuple(known),
        targets=tuple(targets),
        fallback_seconds=tuple(fallback),
        peak_second=peak,
        max_snap_error_s=max_snap,
        superseded_inputs=tuple(sorted(superseded)),
        excluded_inputs=excluded,
        notes=tuple(notes),
    )
