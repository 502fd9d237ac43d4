"""Acquisition schedules: which time points a simulated scanner acquires, and subsampling to them.

Spec strings (also the CLI's ``--schedule``):

- ``every:N``: uniform, one volume every N s from t = 0 (``every:1`` keeps the 1 s series);
- ``irregular:S1@T1,S2@T2,...,Sn``: step S1 while t < T1, then S2 while t < T2, ..., finally Sn,
  e.g. ``irregular:1.5@20,3`` (1.5 s for the first 20 s, then 3 s);
- ``times:t0,t1,...``: explicit acquisition times in seconds (non-integer allowed).

``drop`` removes acquisitions by their index in the schedule (e.g. a motion-corrupted volume), after
the schedule is built. Times must lie within the 1 s series; they are rounded to 1 ms (the precision
written to DICOM). A non-integer time is sampled by linear interpolation in time between the two
neighbouring 1 s volumes: exact for the noise-free signal between samples only to the extent the
curve is linear over 1 s, and it lowers the noise of interpolated volumes (by up to 1/sqrt(2)).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

import numpy as np

from ctp_node.series import CTPSeries

if TYPE_CHECKING:
    from ctp_node.phantom.generator import PhantomStudy

TIME_DECIMALS = 3  # 1 ms
SCAN_START = datetime(2000, 1, 1, 8, 0, 0)  # obviously synthetic time of t = 0 of every phantom study

ScheduleKind = Literal["every", "irregular", "times"]


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: ``steps``/``until`` for every/irregular, ``times`` for explicit times."""

    kind: ScheduleKind
    steps: tuple[float, ...] = ()
    until: tuple[float, ...] = ()
    times: tuple[float, ...] = ()
    drop: tuple[int, ...] = ()


def parse_schedule(spec: str, drop: tuple[int, ...] | list[int] = ()) -> Schedule:
    """Parse ``every:N`` / ``irregular:S@T,...,S`` / ``times:a,b,...``; ValueError says what is wrong."""
    kind, sep, body = spec.strip().partition(":")
    if not sep or not body:
        raise ValueError(f"schedule {spec!r} must look like 'every:4', 'irregular:1.5@20,3' or 'times:0,1.5,3.2'")
    drop = tuple(int(d) for d in drop)
    if kind == "every":
        step = _number(body, spec)
        _check_step(step, spec)
        return Schedule("every", steps=(step,), drop=drop)
    if kind == "irregular":
        parts = [p for p in body.split(",") if p.strip()]
        steps, until = [], []
        for i, part in enumerate(parts):
            step, at, limit = part.partition("@")
            if bool(at) == (i == len(parts) - 1):
                raise ValueError(f"schedule {spec!r}: every step but the last needs '@until' (e.g. 1.5@20,3)")
            steps.append(_number(step, spec))
            _check_step(steps[-1], spec)
            if at:
                until.append(_number(limit, spec))
        if any(b <= a for a, b in zip(until, until[1:], strict=False)):
            raise ValueError(f"schedule {spec!r}: the '@until' times must increase")
        return Schedule("irregular", steps=tuple(steps), until=tuple(until), drop=drop)
    if kind == "times":
        times = tuple(_number(t, spec) for t in body.split(",") if t.strip())
        return Schedule("times", times=times, drop=drop)
    raise ValueError(f"schedule {spec!r}: unknown kind {kind!r}; use every, irregular or times")


def acquisition_times(schedule: Schedule, last_time_s: float) -> np.ndarray:
    """Acquisition times (s, float64, 1 ms precision) up to ``last_time_s``, after dropping volumes."""
    if schedule.kind == "times":
        times = np.round(np.asarray(schedule.times, dtype=np.float64), TIME_DECIMALS)
        if times.size == 0:
            raise ValueError("schedule 'times:' lists no time")
        if np.any(np.diff(times) <= 0):
            raise ValueError(f"schedule times must be strictly increasing (1 ms apart at least), got {times.tolist()}")
        if times[0] < 0 or times[-1] > last_time_s + 1e-9:
            raise ValueError(
                f"schedule times must lie within 0..{last_time_s:g} s (the simulated series), got {times.tolist()}"
            )
    else:
        values, t = [], 0.0
        while t <= last_time_s + 1e-9:
            values.append(t)
            t = round(t + _step_at(schedule, t), TIME_DECIMALS)
        times = np.asarray(values)
    bad = [d for d in schedule.drop if not 0 <= d < times.size]
    if bad:
        raise ValueError(f"drop indices {bad} outside 0..{times.size - 1} (the schedule has {times.size} acquisitions)")
    keep = np.setdiff1d(np.arange(times.size), schedule.drop)
    if keep.size < 2:
        raise ValueError("the schedule leaves fewer than 2 acquisitions: a perfusion series needs several time points")
    return times[keep]


def subsample(hu: np.ndarray, times_s: np.ndarray, at_s: np.ndarray) -> np.ndarray:
    """Volumes of a (T, ...) series at times ``at_s``: exact at given times, linear in between.

    ``times_s`` must be increasing; ``at_s`` within its range (no extrapolation).
    """
    times_s = np.asarray(times_s, dtype=np.float64)
    at_s = np.asarray(at_s, dtype=np.float64)
    if at_s.size and (at_s.min() < times_s[0] - 1e-9 or at_s.max() > times_s[-1] + 1e-9):
        raise ValueError(
            f"times {at_s.min():g}..{at_s.max():g} s outside the series ({times_s[0]:g}..{times_s[-1]:g} s)"
        )
    right = np.clip(np.searchsorted(times_s, at_s, side="left"), 1, times_s.size - 1)
    left = right - 1
    weight = (at_s - times_s[left]) / (times_s[right] - times_s[left])
    out = np.empty((at_s.size, *hu.shape[1:]), dtype=hu.dtype)
    for i, (a, b, w) in enumerate(zip(left, right, weight, strict=True)):
        if w <= 1e-9:
            out[i] = hu[a]
        elif w >= 1 - 1e-9:
            out[i] = hu[b]
        else:
            out[i] = (1.0 - w) * hu[a] + w * hu[b]
    return out


def sample_study(study: PhantomStudy, schedule: Schedule) -> CTPSeries:
    """The series a scanner following ``schedule`` would have acquired from ``study``.

    ``times_s`` become relative to the first kept acquisition; ``start`` records its absolute time
    (SCAN_START + its time in the 1 s study), so dropped leading volumes shift the start.
    """
    at = acquisition_times(schedule, float(study.times_s[-1]))
    return CTPSeries(
        hu=subsample(study.hu, study.times_s, at),
        times_s=at - at[0],
        origin=study.origin_mm,
        spacing_mm=study.spacing_mm,
        direction=np.eye(3),
        start=SCAN_START + timedelta(seconds=float(at[0])),
    )


def _step_at(schedule: Schedule, t: float) -> float:
    for step, until in zip(schedule.steps, schedule.until, strict=False):
        if t < until - 1e-9:
            return step
    return schedule.steps[-1]


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"schedule {spec!r}: {text.strip()!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"schedule {spec!r}: {text.strip()!r} is not a finite number")
    return value


def _check_step(step: float, spec: str) -> None:
    if step < 0.001:
        raise ValueError(f"schedule {spec!r}: steps must be at least 0.001 s, got {step:g}")
