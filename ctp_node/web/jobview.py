"""What the status page shows of a job, read from the job store, the audit trail and the job's folders.

Read only: nothing here changes a job, and nothing here knows the job store's tables. The job list
is the store's read side (``ctp_node.node.shared.jobs_read.JobQueries.rows``: one query for the jobs, one
for their deliveries) and one header per job for the patient and series (from its spooled files,
where ``ctp_node.node.shared.spool.series_dir`` says they are); a job's page adds its audit trail, the
guardrail's verdict (``guardrail.json``), the output series (every series the send stage delivers:
the results folder's DICOM files, ``ResultsLayout.files``, one header read per series) and the QA
figures (``*.png``) found in its results folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ctp_node.errors import InvalidUIDError
from ctp_node.node.shared.jobs_read import JobRow, SeriesJob, State
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.shared.spool import SeriesKey, series_dir
from ctp_node.series.guardrail import VERDICT_FILE
from ctp_node.series.motion import MOTION_FILE
from ctp_node.series.pipeline import VOLUMES_FILE

log = logging.getLogger(__name__)

HEADER_TAGS = ("PatientName", "PatientID", "StudyDate", "StudyTime", "Modality", "SeriesDescription", "SeriesNumber")
MAX_FIGURES = 50
MASK = "\u2022\u2022\u2022"  # •••


@dataclass(frozen=True)
class SeriesHeader:
    """The few header values the page shows of a series (patient values masked as configured)."""

    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    study_time: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: str = ""


@dataclass(frozen=True)
class DerivedGroup:
    """One output series of a result (the 1 s series, a map, the SR, the SEG, the QA report...): its
    files, described by the first one's header."""

    prefix: str  # the files' folder within the result and name prefix, e.g. "perfusion/cbf_synthetic/CBF…"
    files: int
    bytes: int
    header: SeriesHeader
    sop_class: str
    series_uid: str


@dataclass
class AuditSummary:
    """A job's audit trail: the instances received in one line per calling AE, every other event whole."""

    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    lines_read: int = 0


# --- patient and series headers ------------------------------------------------------------------
def mask_name(name: str) -> str:
    """A DICOM person name (Family^Given^Middle...) as initials: "DOE^JOHN" -> "D. J."."""
    parts = [p.strip() for p in name.split("=")[0].split("^")[:3]]
    initials = [f"{p[0].upper()}." for p in parts if p]
    return " ".join(initials) if initials else ""


def mask_id(patient_id: str) -> str:
    """The last 3 characters of an ID of at least 6, nothing of a shorter one."""
    patient_id = patient_id.strip()
    if not patient_id:
        return ""
    return MASK + patient_id[-3:] if len(patient_id) >= 6 else MASK


def _first_dicom(folder: Path) -> Path | None:
    """The first .dcm file a scan of ``folder`` meets (not a listing of a folder of thousands, sorted)."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".dcm") and not entry.name.startswith(".") and entry.is_file():
                    return Path(entry.path)
    except OSError:
        return None
    return None


def read_header(path: Path, mask_patient: bool) -> tuple[SeriesHeader, str, str]:
    """The header values of one file (masked as configured), its SOP class name and series UID."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    name, patient_id = str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")
    if mask_patient:
        name, patient_id = mask_name(name), mask_id(patient_id)
    header = SeriesHeader(
        patient_name=name,
        patient_id=patient_id,
        study_date=str(ds.get("StudyDate", "") or ""),
        study_time=str(ds.get("StudyTime", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=str(ds.get("SeriesNumber", "") or ""),
    )
    sop_class = ds.get("SOPClassUID")
    sop_name = getattr(sop_class, "name", str(sop_class or "")) if sop_class is not None else ""
    return header, sop_name, str(ds.get("SeriesInstanceUID", "") or "")


class HeaderCache:
    """The source series' header per job generation, read once (a job's files do not change)."""

    def __init__(self, spool_dir: Path, mask_patient: bool, size: int = 2048) -> None:
        self.spool_dir, self.mask_patient, self.size = Path(spool_dir), mask_patient, size
        self._cache: OrderedDict[tuple[int, int], SeriesHeader] = OrderedDict()
        self._lock = threading.Lock()  # pages are rendered in a thread pool

    def get(self, job: SeriesJob) -> SeriesHeader:
        key = (job.id, job.generation)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        header = self._read(job)  # outside the lock: a slow disk holds up only this page
        if header is None:  # an unreadable header is tried again next time (the file may arrive)
            return SeriesHeader()
        with self._lock:
            self._cache[key] = header
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return header

    def _read(self, job: SeriesJob) -> SeriesHeader | None:
        try:
            folders = [series_dir(self.spool_dir, SeriesKey(job.study_uid, job.series_uid))]
        except InvalidUIDError:  # the receiver spools only valid UIDs: such a job has no spooled files
            folders = []
        if job.result_dir:
            folders.append(Path(job.result_dir))
        for folder in folders:
            path = _first_dicom(folder)
            if path is None:
                continue
            try:
                return read_header(path, self.mask_patient)[0]
            except Exception as exc:  # a damaged file: the page shows the job without these values
                log.warning("job %d: cannot read the header of %s: %s", job.id, path.name, exc)
        return None


# --- a job's results folder ------------------------------------------------------------------------
def result_folder(job: SeriesJob) -> Path | None:
    if not job.result_dir:
        return None
    folder = Path(job.result_dir)
    return folder if folder.is_dir() else None


def derived_series(folder: Path, mask_patient: bool) -> list[DerivedGroup]:
    """Every output series of a result: the files the send stage delivers (``ResultsLayout.files``: the
    1 s series at the top, each perfusion output in its own folder below) grouped by folder and name
    prefix, one header read per group, groups of one SeriesInstanceUID joined. The synthetic series
    comes first, then the others by folder."""
    groups: dict[str, list[Path]] = {}
    for path in ResultsLayout.files(folder):
        relative = path.relative_to(folder)
        prefix = relative.name.split("_")[0]
        key = f"{relative.parent.as_posix()}/{prefix}" if relative.parent != Path(".") else prefix
        groups.setdefault(key, []).append(path)
    by_uid: dict[str, DerivedGroup] = {}
    result: list[DerivedGroup] = []
    for key, files in sorted(groups.items(), key=lambda item: ("/" in item[0], item[0])):
        first = min(files)
        try:
            header, sop_class, series_uid = read_header(first, mask_patient)
        except Exception as exc:
            log.warning("cannot read %s: %s", first, exc)
            header, sop_class, series_uid = SeriesHeader(), "unreadable", ""
        size = sum(_size(p) for p in files)
        earlier = by_uid.get(series_uid) if series_uid else None
        if earlier is not None:  # one series written under two prefixes: one row
            joined = DerivedGroup(earlier.prefix, earlier.files + len(files), earlier.bytes + size,
                                  earlier.header, earlier.sop_class, series_uid)  # fmt: skip
            result[result.index(earlier)] = by_uid[series_uid] = joined
            continue
        group = DerivedGroup(key, len(files), size, header, sop_class, series_uid)
        result.append(group)
        if series_uid:
            by_uid[series_uid] = group
    return result


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile (a rotation): counted, not sized
        return 0


def figures(folder: Path) -> list[str]:
    """The PNG figures in a results folder and its subfolders, as paths relative to it."""
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if p.is_file())
    return found[:MAX_FIGURES]


def guardrail_verdict(folder: Path) -> dict[str, Any] | None:
    return _record(folder / VERDICT_FILE)


def motion_record(folder: Path) -> dict[str, Any] | None:
    """The motion stage's record (``motion.json``: every volume's pose and the ones not used)."""
    return _record(folder / MOTION_FILE)


def volumes_record(folder: Path) -> dict[str, Any] | None:
    """The perfusion analyses' lesion volumes (``volumes.json``): reported, or withheld and why."""
    record = _record(folder / VOLUMES_FILE)
    return record if record is None or "checks" not in record else None  # unreadable: logged, not shown


def _record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {"summary": f"unreadable: {exc}", "checks": []}


def processing_attempts(row: JobRow, audit: AuditSummary) -> int | None:
    """How many processing attempts the job's current generation took or has taken so far.

    The store's ``attempts`` counts claims: processing attempts while the job is queued or processed,
    but it starts again from 0 once a result is recorded and then counts sending passes, so for a job
    past processing the audit trail's ``processing`` lines of the generation say it (None: unknown)."""
    job = row.job
    if job.state in (State.QUEUED, State.PROCESSING):
        return job.attempts
    counted = [e for e in audit.events if e.get("event") == "processing" and e.get("generation") == job.generation]
    return len(counted) or None


def detailed_stages(row: JobRow, audit: AuditSummary) -> list[tuple[str, float | None]]:
    """The stages of ``row.stages`` with the audit trail's times added: waiting for a worker, sending."""

    def last(event: str) -> datetime | None:
        times = [
            r["time"] for r in audit.events if r.get("event") == event and r.get("generation") == row.job.generation
        ]
        return datetime.fromisoformat(max(times)) if times else None

    started, processed, sent = last("processing"), last("processed"), last("sent")
    waiting = (started - row.queued_at).total_seconds() if started and row.queued_at else None
    sending = (sent - processed).total_seconds() if sent and processed else None
    stages = dict(row.stages())
    return [
        ("receiving", stages["receiving"]),
        ("until queued", stages["until queued"]),
        ("waiting for a worker", waiting if waiting is None or waiting >= 0 else None),
        ("processing", stages["processing"]),
        ("sending", sending if sending is None or sending >= 0 else None),
        ("in all", stages["in all"]),
    ]


# --- audit trail ---------------------------------------------------------------------------------
def audit_trail(path: Path, series_uid: str, max_events: int = 500) -> AuditSummary:
    """The series' lines of the audit trail (streamed: the file grows by one line per instance)."""
    summary = AuditSummary()
    if not path.is_file():
        return summary
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            summary.lines_read += 1
            if series_uid not in line:  # a cheap filter before parsing
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if series_uid not in (record.get("series_uid"), record.get("source_series_uid")):
                continue
            if record.get("event") == "received":
                key = f"{record.get('calling_ae', '')} from {record.get('host', '')}"
                seen = summary.received.setdefault(
                    key, {"instances": 0, "first": record["time"], "last": record["time"]}
                )
                seen["instances"] += 1
                seen["first"], seen["last"] = min(seen["first"], record["time"]), max(seen["last"], record["time"])
            elif len(summary.events) < max_events:
                summary.events.append(record)
    return summary
