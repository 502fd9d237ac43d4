"""What the status page shows of a job, read from the job store, the audit trail and the job's folders.

Read only: nothing here changes a job. The job list reads the store (one query for the jobs, one
for their deliveries) and one header per job for the patient and series; a job's page adds its
audit trail, the guardrail's verdict (``guardrail.json``), the derived series and the QA figures
(``*.png``) found in its results folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ctp_node.node.jobs import Delivery, JobStore, SeriesJob, State, deliveries_table, series_table
from ctp_node.series.guardrail import VERDICT_FILE
from ctp_node.series.motion import MOTION_FILE
from ctp_node.series.pipeline import VOLUMES_FILE

log = logging.getLogger(__name__)

HEADER_TAGS = ("PatientName", "PatientID", "StudyDate", "Modality", "SeriesDescription", "SeriesNumber")
MAX_FIGURES = 50
MASK = "\u2022\u2022\u2022"  # •••


@dataclass(frozen=True)
class JobRow:
    """One series job with the store's times the SeriesJob snapshot leaves out, and its deliveries."""

    job: SeriesJob
    queued_at: datetime | None
    updated_at: datetime
    deliveries: list[Delivery]

    def stages(self) -> list[tuple[str, float | None]]:
        """Seconds per stage known from the store: receiving, waiting until queued, processing, in all."""
        job = self.job
        receiving = (job.last_received_at - job.first_received_at).total_seconds()
        waiting = (self.queued_at - job.last_received_at).total_seconds() if self.queued_at else None
        finished = job.state in (State.DONE, State.FAILED, State.IGNORED)
        total = (self.updated_at - job.first_received_at).total_seconds() if finished else None
        return [
            ("receiving", receiving),
            ("until queued", waiting),
            ("processing", job.processing_s),
            ("in all", total),
        ]


@dataclass(frozen=True)
class SeriesHeader:
    """The few header values the page shows of a series (patient values masked as configured)."""

    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: str = ""


@dataclass(frozen=True)
class DerivedGroup:
    """Files of one kind in the results folder (the 1 s series, other objects), described by the first."""

    prefix: str
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


def _aware(value: datetime | None) -> datetime | None:
    from datetime import timezone

    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _job_rows(store: JobStore, where: Any, limit: int) -> list[JobRow]:
    s, d = series_table.c, deliveries_table.c
    query = select(series_table).order_by(s.id.desc()).limit(limit)
    if where is not None:
        query = query.where(where)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
        ids = [r.id for r in rows]
        deliveries: dict[int, list[Delivery]] = {i: [] for i in ids}
        if ids:
            for r in conn.execute(select(deliveries_table).where(d.series_id.in_(ids)).order_by(d.id)):
                deliveries[r.series_id].append(Delivery.from_row(r))
    return [
        JobRow(SeriesJob.from_row(r), _aware(r.queued_at), _aware(r.updated_at), deliveries[r.id])  # type: ignore[arg-type]
        for r in rows
    ]


def list_jobs(store: JobStore, states: Sequence[State] = (), limit: int = 100) -> list[JobRow]:
    """Newest first, at most ``limit``, only ``states`` when given."""
    where = series_table.c.state.in_([s.value for s in states]) if states else None
    return _job_rows(store, where, limit)


def get_job(store: JobStore, job_id: int) -> JobRow | None:
    rows = _job_rows(store, series_table.c.id == job_id, 1)
    return rows[0] if rows else None


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
        folders = [self.spool_dir / job.study_uid / job.series_uid]
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
    """The DICOM files of a results folder grouped by name prefix (CTP1S_..., other objects), one header each."""
    groups: dict[str, list[os.DirEntry[str]]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".dcm") and not entry.name.startswith(".") and entry.is_file():
                groups.setdefault(entry.name.split("_")[0], []).append(entry)
    result = []
    for prefix, files in sorted(groups.items()):
        first = min(files, key=lambda e: e.name)
        try:
            header, sop_class, series_uid = read_header(Path(first.path), mask_patient)
        except Exception as exc:
            log.warning("cannot read %s: %s", first.path, exc)
            header, sop_class, series_uid = SeriesHeader(), "unreadable", ""
        size = sum(e.stat().st_size for e in files)
        result.append(DerivedGroup(prefix, len(files), size, header, sop_class, series_uid))
    return result


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
