"""Does a received series look like a whole CTP series? Judged from a few header tags per instance.

The receiver records, per instance, its slice position (ImagePositionPatient, rounded to 0.01 mm as
the assembler rounds it), a time key (TemporalPositionIdentifier, else AcquisitionNumber) and, for a
multi-frame (Enhanced CT) instance, its number of frames: from the header the SCP reads anyway to
check the instance's identity (``facts_from_header``), or, for files found in the spool at start,
from the file's header (``read_facts``); only the elements up to NumberOfFrames, never the
functional groups or the pixel data.

The verdict (``judge``) is one of:

- ``complete``: every slice position holds the same number of instances (at least
  ``min_time_points``), and where the time key names the volumes, every volume holds every
  position and no volume number is skipped; Enhanced CT: every instance holds the same number of
  frames. Such a series is queued after the short ``series.complete_quiet_period_s``.
- ``incomplete``: positions hold unequal numbers of instances, a volume lacks slices, or a volume
  number is missing in between. The series waits (up to ``series.incomplete_wait_s``) for the rest.
- ``unknown``: the headers do not say (no positions, too few volumes so far, unreadable files): the
  ordinary ``series.quiet_period_s`` applies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctp_node.config import SeriesSettings

ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LAST_TAG_READ = 0x00280008  # NumberOfFrames; everything the verdict needs comes before it
MAX_COORDINATE_MM = 1e6  # beyond this a position is nonsense (and would not fit the column)
INT32 = 2**31 - 1
KEY_LENGTH = 32


@dataclass(frozen=True)
class InstanceFacts:
    """What the completeness check needs of one instance; ``None`` where the header does not say."""

    sop_uid: str
    position: str | None = None
    time_key: str | None = None
    instance_number: int | None = None
    frames: int | None = None  # multi-frame instances only


def _int(value: object) -> int | None:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if -INT32 <= number <= INT32 else None


def _position(value: object) -> str | None:
    try:
        coordinates = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(coordinates) != 3 or not all(math.isfinite(v) and abs(v) < MAX_COORDINATE_MM for v in coordinates):
        return None
    return "\\".join(f"{round(v, 2) + 0.0:.2f}" for v in coordinates)  # + 0.0: -0.00 and 0.00 are one position


def facts_from_header(sop_uid: str, header) -> InstanceFacts:
    """The facts in a (partial) pydicom dataset."""
    if str(header.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE:
        return InstanceFacts(sop_uid, frames=max(_int(header.get("NumberOfFrames", 1)) or 1, 1))
    temporal = header.get("TemporalPositionIdentifier")
    acquisition = header.get("AcquisitionNumber")
    time_key = None
    if temporal not in (None, ""):
        time_key = f"t{str(temporal).strip()}"[:KEY_LENGTH]
    elif acquisition not in (None, ""):
        time_key = f"a{str(acquisition).strip()}"[:KEY_LENGTH]
    return InstanceFacts(
        sop_uid,
        position=_position(header.get("ImagePositionPatient")),
        time_key=time_key,
        instance_number=_int(header.get("InstanceNumber")),
    )


def read_facts(path: Path, sop_uid: str) -> InstanceFacts:
    """The facts of a spooled file; only the SOP Instance UID when the header cannot be read."""
    from pydicom.filereader import read_partial

    try:
        with open(path, "rb") as fh:
            header = read_partial(fh, stop_when=lambda tag, vr, length: tag > LAST_TAG_READ)
        return facts_from_header(sop_uid, header)
    except Exception:  # the spool accepts what the SCP accepted; a damaged header only means "unknown"
        return InstanceFacts(sop_uid)


@dataclass(frozen=True)
class Verdict:
    kind: str  # complete, incomplete, unknown
    reason: str


def _time_points_missing(keys: list[str]) -> list[int]:
    """Volume numbers skipped between the first and the last (keys like 't3' or 'a3'), by their smallest step."""
    try:
        numbers = sorted(int(k[1:]) for k in keys)
    except ValueError:
        return []
    steps = [b - a for a, b in zip(numbers, numbers[1:])]
    step = min(steps, default=0)
    if step <= 0:
        return []
    present = set(numbers)
    return [n for n in range(numbers[0], numbers[-1], step) if n not in present][:10]


def judge(rows: Iterable[tuple[str | None, str | None, int | None]], min_time_points: int = 3) -> Verdict:
    """The verdict on one series from its instances' (position, time_key, frames)."""
    rows = list(rows)
    if not rows:
        return Verdict("unknown", "no instances")
    multiframe = [frames for _, _, frames in rows if frames is not None]
    if multiframe:
        if len(multiframe) != len(rows):
            return Verdict("unknown", "single-frame and multi-frame instances mixed")
        sizes = Counter(multiframe)
        if len(sizes) > 1:
            described = ", ".join(f"{n} with {f} frames" for f, n in sorted(sizes.items()))
            return Verdict("incomplete", f"multi-frame instances hold unequal numbers of frames ({described})")
        return Verdict("complete", f"{len(rows)} multi-frame instances of {multiframe[0]} frames")
    if any(position is None for position, _, _ in rows):
        return Verdict("unknown", "instances without a readable ImagePositionPatient")
    per_position = Counter(position for position, _, _ in rows)
    counts = Counter(per_position.values())
    if len(counts) > 1:
        short = sum(n for count, n in counts.items() if count < max(counts))
        return Verdict(
            "incomplete",
            f"{len(rows)} instances at {len(per_position)} slice positions holding {min(counts)} to "
            f"{max(counts)} instances each ({short} positions hold fewer than {max(counts)})",
        )
    time_points = next(iter(counts))
    keys = [key for _, key, _ in rows]
    per_key = Counter(keys)
    if None not in per_key and len(per_key) == time_points:  # the key names the volumes
        lacking = {key: n for key, n in per_key.items() if n != len(per_position)}
        if lacking:
            key, n = sorted(lacking.items())[0]
            return Verdict(
                "incomplete",
                f"{len(lacking)} time points do not hold one instance per slice position (time point {key[1:]}: "
                f"{n} of {len(per_position)})",
            )
        missing = _time_points_missing(list(per_key))
        if missing:
            return Verdict("incomplete", f"time points {', '.join(map(str, missing))} missing between the others")
    if time_points < min_time_points:
        return Verdict("unknown", f"{time_points} time points so far (fewer than {min_time_points})")
    return Verdict("complete", f"{time_points} time points x {len(per_position)} slice positions")


# --- the completion policy: which wait applies -------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """How long a series must stay quiet before it is queued, and the warning it is queued with."""

    seconds: float
    warning: str | None = None


@dataclass(frozen=True)
class CompletionPolicy:
    """Which wait applies to a receiving series (the ``[series]`` settings); the job store asks it for
    each quiet series (``JobStore.queue_quiet_series``) and queues the series whose wait is over.

    Without ``complete_quiet_period_s`` and ``incomplete_wait_s`` the headers are not read: quiet for
    ``quiet_period_s``. With them, a series that looks complete, and was never re-opened by a late
    instance (generation 1: after a late arrival more may come), waits ``complete_quiet_period_s``; one
    that looks incomplete waits for the rest up to ``incomplete_wait_s`` and is then queued anyway,
    with a warning on the job; one the headers say nothing about, ``quiet_period_s``.
    """

    quiet_period_s: float
    complete_quiet_period_s: float | None = None
    incomplete_wait_s: float | None = None
    min_time_points: int = 3

    @classmethod
    def of(cls, series: SeriesSettings) -> CompletionPolicy:
        """The policy of the ``[series]`` settings (``ctp_node.config.SeriesSettings``)."""
        return cls(
            series.quiet_period_s, series.complete_quiet_period_s, series.incomplete_wait_s, series.min_time_points
        )

    @property
    def shortest_s(self) -> float:
        """No series is queued sooner: the store looks only at series quiet for this long."""
        return min(self.quiet_period_s, self.complete_quiet_period_s or self.quiet_period_s)

    @property
    def judges(self) -> bool:
        return self.complete_quiet_period_s is not None or self.incomplete_wait_s is not None

    def wait(
        self, generation: int, instances: Callable[[], Iterable[tuple[str | None, str | None, int | None]]]
    ) -> Wait:
        """The wait of a series of ``generation``; ``instances`` gives its (position, time_key, frames),
        asked only when the policy judges them."""
        if not self.judges:
            return Wait(self.quiet_period_s)
        verdict = judge(instances(), self.min_time_points)
        if verdict.kind == "complete" and generation == 1 and self.complete_quiet_period_s is not None:
            return Wait(min(self.complete_quiet_period_s, self.quiet_period_s))
        if verdict.kind == "incomplete" and self.incomplete_wait_s is not None:
            seconds = max(self.incomplete_wait_s, self.quiet_period_s)
            return Wait(seconds, f"queued incomplete after {seconds:g} s without a new instance: {verdict.reason}")
        return Wait(self.quiet_period_s)
