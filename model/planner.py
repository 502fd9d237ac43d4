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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
        return scenario_one_hot(self.scenario)


FillKind = Literal["acquired", "synthetic", "interpolated"]
REASON_LONG_GAP = "long gap"
REASON_GUARDRAIL = "guardrail"


@dataclass(frozen=True)
class FillCounts:
    """How the voxels of one output image were filled on the source grid (``ctp_node.series.grid``'s rule)."""

    acquired: int = 0
    model: int = 0
    vessel_fit: int = 0
    linear: int = 0

    def describe(self) -> str:
        """'model: N voxels, vessel fit: M voxels, linear: K voxels' (acquired images: all acquired)."""
        if self.acquired:
            return f"acquired: {self.acquired} voxels"
        return f"model: {self.model} voxels, vessel fit: {self.vessel_fit} voxels, linear: {self.linear} voxels"


@dataclass(frozen=True)
class SecondFill:
    """What fills one second of the 1 s grid, and when its image shows.

    ``acquired``: input volume ``left`` (== ``right``), unchanged. ``synthetic``: the model, between
    the acquired volumes ``left`` and ``right``. ``interpolated``: linear in time between them
    (``reason``: the long-gap policy, or the guardrail replacing the model). ``weight``: the position of
    the second between its volumes' snapped seconds (0 for acquired); ``time_s``: the true time of what
    the image shows, ``t_left + weight * (t_right - t_left)`` (an acquired volume's own time), on the
    clock of the input times. ``replaces``: an input volume marked unusable whose second this is.
    ``voxels``: how the source-grid stage filled the image's voxels (model, vessel fit, linear), once
    it has run.
    """

    second: int
    kind: FillKind
    left: int
    right: int
    weight: float
    time_s: float
    reason: str = ""
    replaces: int | None = None
    voxels: FillCounts | None = None

    @property
    def volumes(self) -> tuple[int, ...]:
        """The input volumes this second's image is made from: ``(left,)`` if acquired, else ``(left, right)``."""
        return (self.left,) if self.kind == "acquired" else (self.left, self.right)

    def interpolate(self, volumes: Sequence[np.ndarray] | Mapping[int, np.ndarray] | np.ndarray) -> np.ndarray:
        """``I``, the linear interpolation in time of ``volumes[left]`` and ``volumes[right]`` at ``weight``.

        ``volumes``: anything indexed by input volume (an (N, ...) stack, or a dict of the volumes
        needed). The one formula of every stage that interpolates a second (the engine's long-gap
        fallback, the way back to the source grid, the guardrail's reference), so that they agree to
        the last bit: a model that returns interpolation then changes nothing on the way back.
        """
        left, right = volumes[self.left], volumes[self.right]
        return left + np.float32(self.weight) * (right - left)


@dataclass(frozen=True)
class FillPlan:
    """The 1 s grid of one study and what fills each second: planned once per study, from the times alone.

    Every stage after the engine reads it (the source-grid stage, the guardrail, the DICOM writer);
    the conditioning of the model's targets, which depends on each slab's frame sums, is in
    ``InpaintPlan``.
    """

    t0_s: float
    seconds: np.ndarray  # (T1,) whole seconds from t0 covered by the output, consecutive
    input_second: np.ndarray  # (N,) the second each input volume landed on; -1 if not used
    known_seconds: tuple[int, ...]  # seconds filled by an acquired volume
    fills: tuple[SecondFill, ...]  # one per grid second
    max_tr: int
    max_snap_error_s: float
    superseded_inputs: tuple[int, ...] = ()
    excluded_inputs: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def times_s(self) -> np.ndarray:
        """Absolute times of the output grid (same clock as the input times)."""
        return self.t0_s + self.seconds.astype(np.float64)

    @property
    def true_times_s(self) -> np.ndarray:
        """The time of what each image shows (``SecondFill.time_s``), strictly increasing."""
        return np.array([f.time_s for f in self.fills], dtype=np.float64)

    @property
    def volumes(self) -> tuple[int, ...]:
        """The input volumes some second of the plan is made from, in order (``SecondFill.volumes``)."""
        return tuple(sorted({v for f in self.fills for v in f.volumes}))

    def index(self, second: int) -> int:
        """Position of a grid second in the output sequence."""
        return int(second - self.seconds[0])

    def _kind_mask(self, kind: str, reason: str | None = None) -> np.ndarray:
        return np.array([f.kind == kind and reason in (None, f.reason) for f in self.fills], dtype=bool)

    @property
    def synthetic(self) -> np.ndarray:
        """(T1,) bool: seconds the model fills."""
        return self._kind_mask("synthetic")

    @property
    def interpolated(self) -> np.ndarray:
        """(T1,) bool: seconds filled by linear interpolation (long-gap policy or guardrail fallback)."""
        return self._kind_mask("interpolated")

    @property
    def fallback(self) -> np.ndarray:
        """(T1,) bool: seconds the long-gap policy interpolates."""
        return self._kind_mask("interpolated", REASON_LONG_GAP)

    @property
    def acquired(self) -> np.ndarray:
        return self._kind_mask("acquired")

    @property
    def model_seconds(self) -> tuple[int, ...]:
        return tuple(f.second for f in self.fills if f.kind == "synthetic")

    @property
    def fallback_seconds(self) -> tuple[int, ...]:
        return tuple(f.second for f in self.fills if f.kind == "interpolated" and f.reason == REASON_LONG_GAP)

    @property
    def model_gaps(self) -> tuple[tuple[int, int], ...]:
        """(left, right) snapped seconds of the acquired pairs whose seconds between the model fills."""
        known = self.known_seconds
        return tuple((lo, hi) for lo, hi in zip(known[:-1], known[1:]) if 1 < hi - lo <= self.max_tr)

    def with_voxels(self, counts: Sequence[FillCounts]) -> FillPlan:
        """The same plan with the source-grid stage's voxel counts, one per second."""
        if len(counts) != len(self.fills):
            raise ValueError(f"got {len(counts)} voxel counts for {len(self.fills)} seconds: give one per second")
        return replace(self, fills=tuple(replace(f, voxels=c) for f, c in zip(self.fills, counts)))

    def model_replaced(self, reason: str = REASON_GUARDRAIL) -> FillPlan:
        """Every model second now interpolated (the guardrail's fallback); the voxel counts, which
        described the replaced images, are dropped."""
        fills = tuple(
            replace(f, kind="interpolated", reason=reason, voxels=None)
            if f.kind == "synthetic"
            else replace(f, voxels=None)
            for f in self.fills
        )
        return replace(self, fills=fills)


@dataclass(frozen=True)
class InpaintPlan:
    """One sequence's conditioning of the model's targets on the study's ``FillPlan``.

    The peak (and so each target's scenario) follows the sequence's own frame sums, as the published
    model sees one 8-slice sequence at a time; everything else is the study's plan.
    """

    fill: FillPlan
    targets: tuple[Target, ...]  # seconds the model synthesises
    peak_second: int

    @property
    def t0_s(self) -> float:
        return self.fill.t0_s

    @property
    def seconds(self) -> np.ndarray:
        return self.fill.seconds

    @property
    def input_second(self) -> np.ndarray:
        return self.fill.input_second

    @property
    def known_seconds(self) -> tuple[int, ...]:
        return self.fill.known_seconds

    @property
    def fallback_seconds(self) -> tuple[int, ...]:
        return self.fill.fallback_seconds

    @property
    def max_snap_error_s(self) -> float:
        return self.fill.max_snap_error_s

    @property
    def superseded_inputs(self) -> tuple[int, ...]:
        return self.fill.superseded_inputs

    @property
    def excluded_inputs(self) -> tuple[int, ...]:
        return self.fill.excluded_inputs

    @property
    def notes(self) -> tuple[str, ...]:
        return self.fill.notes

    @property
    def times_s(self) -> np.ndarray:
        return self.fill.times_s

    def index(self, second: int) -> int:
        return self.fill.index(second)


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


def scenario_one_hot(scenario: int) -> tuple[float, float, float]:
    """The network's global context: the contrast scenario (0 rising, 1 around peak, 2 falling) one-hot."""
    if scenario not in (0, 1, 2):
        raise ValueError(f"contrast scenario must be 0, 1 or 2, got {scenario!r}")
    return (float(scenario == 0), float(scenario == 1), float(scenario == 2))


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
    """Plan every missing second of one sequence: ``plan_seconds`` then ``condition_targets``.

    ``times_s``: acquisition time of each input volume, increasing. ``frame_sums``: the sum of all
    voxel values of each input volume in the 0..80 window (the published peak statistic).
    ``usable``: False for volumes the caller marks as unusable (treated as missing).
    """
    sums = np.asarray(frame_sums, dtype=np.float64)
    times = np.asarray(times_s, dtype=np.float64)
    if times.ndim == 1 and times.size and sums.shape != times.shape:
        raise PlanError(f"got {times.size} times but {sums.size} frame sums: give one per volume")
    return condition_targets(plan_seconds(times_s, usable=usable, max_tr=max_tr, long_gap=long_gap), sums)


def plan_seconds(
    times_s: Sequence[float] | np.ndarray,
    *,
    usable: Sequence[bool] | np.ndarray | None = None,
    max_tr: int = PUBLISHED_MAX_TR,
    long_gap: LongGapPolicy = "error",
) -> FillPlan:
    """What fills each second of one study (the rules of the module docstring): depends on the times alone."""
    times = np.asarray(times_s, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise PlanError("times_s must be a non-empty 1-D sequence of acquisition times in seconds")
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

    replaced = {int(seconds[i]): i for i in excluded}
    fills: list[SecondFill] = []
    long_gaps: list[tuple[int, int]] = []
    for left, right in zip(known[:-1], known[1:]):
        l_in, r_in = by_second[left], by_second[right]
        fills.append(SecondFill(left, "acquired", l_in, l_in, 0.0, float(times[l_in])))
        gap = right - left
        if gap > max_tr:
            long_gaps.append((left, right))
        kind: FillKind = "interpolated" if gap > max_tr else "synthetic"
        for sec in range(left + 1, right):
            w = (sec - left) / gap
            fills.append(
                SecondFill(
                    sec,
                    kind,
                    l_in,
                    r_in,
                    float(w),
                    float(times[l_in] + w * (times[r_in] - times[l_in])),
                    reason=REASON_LONG_GAP if gap > max_tr else "",
                    replaces=replaced.get(sec),
                )  # fmt: skip
            )
    fills.append(SecondFill(last, "acquired", by_second[last], by_second[last], 0.0, float(times[by_second[last]])))
    if long_gaps:
        described = ", ".join(f"{hi - lo} s between seconds {lo} and {hi}" for lo, hi in long_gaps)
        if long_gap == "error":
            raise LongGapError(
                f"gaps longer than the trained maximum of {max_tr} s: {described}. The model is not asked to "
                "extrapolate; choose the long-gap policy 'linear' to fill them by linear interpolation"
            )
        notes.append(f"long gaps filled by linear interpolation, not by the model: {described}")

    return FillPlan(
        t0_s=float(times[0]),
        seconds=np.arange(first, last + 1, dtype=np.int64),
        input_second=input_second,
        known_seconds=tuple(known),
        fills=tuple(fills),
        max_tr=int(max_tr),
        max_snap_error_s=max_snap,
        superseded_inputs=tuple(sorted(superseded)),
        excluded_inputs=excluded,
        notes=tuple(notes),
    )


def condition_targets(fill: FillPlan, frame_sums: Sequence[float] | np.ndarray) -> InpaintPlan:
    """The published conditioning of every model second of ``fill``, for one sequence whose input
    volumes have ``frame_sums`` (one per input volume; the peak rule uses those of the kept volumes)."""
    sums = np.asarray(frame_sums, dtype=np.float64)
    if sums.shape != fill.input_second.shape:
        raise PlanError(f"got {fill.input_second.size} times but {sums.size} frame sums: give one per volume")
    sum_by_second = {int(sec): float(sums[i]) for i, sec in enumerate(fill.input_second) if sec >= 0}
    peak = peak_second(sum_by_second, fill.known_seconds)
    targets = []
    for left, right in fill.model_gaps:
        scenario = contrast_scenario(left, right, peak)
        for sec in range(left + 1, right):
            targets.append(Target(sec, left, right, local_context(sec, left, right, fill.max_tr), scenario))
    return InpaintPlan(fill=fill, targets=tuple(targets), peak_second=peak)
