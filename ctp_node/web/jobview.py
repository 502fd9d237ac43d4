"""What the status page shows of a job, read from the job store, the audit trail and the job's folders.

Read only: nothing here changes a job, and nothing here knows the job store's tables. The job list
is the store's read side (``ctp_node.node.shared.jobs_read.JobQueries.rows``: one query for the jobs, one
for their deliveries) and one header per job for the patient and series (from its spooled files,
where ``ctp_node.node.shared.spool.series_dir`` says they are); a job's page adds its audit trail, the
guardrail's verdict (``guardrail.json``), the output series (every series the send stage delivers:
the results folder's DICOM files, ``ResultsLayout.files``, one header read per series) and the QA
figures (``*.png``) found in its results folder.

A result in the object store (``job.result_dir`` an ``s3://`` address) is shown the same way, read by
``StoreResults``: one bounded listing of the result's objects, kept a short while per address; the
records and figures by GET, a header per series by a ranged GET of the file's first bytes (never a whole
series). A store that does not answer leaves the page without them and with ``StoreResult.error`` to say why.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ctp_node.config import StorageSettings
from ctp_node.errors import ConfigError, InvalidUIDError
from ctp_node.node.shared.jobs_read import JobRow, SeriesJob, State
from ctp_node.node.shared.object_results import ObjectResults
from ctp_node.node.shared.object_spool import ObjectSpool
from ctp_node.node.shared.object_store import ObjectStore, StoreUnavailable, is_uri
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


def read_header(path: Path | BinaryIO, mask_patient: bool) -> tuple[SeriesHeader, str, str]:
    """The header values of one file, or of a file's first bytes (masked as configured), its SOP class
    name and series UID."""
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

    def get(self, job: SeriesJob, fallback: Callable[[], SeriesHeader | None] | None = None) -> SeriesHeader:
        """``fallback``: where else to read it when no local file has it (a job's page: its result in the
        object store); what it reads is kept for the job list too."""
        key = (job.id, job.generation)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        header = self._read(job)  # outside the lock: a slow disk holds up only this page
        if header is None and fallback is not None:
            header = fallback()
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
        if job.result_dir and not is_uri(job.result_dir):  # a result in the object store: the page's fallback
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


@dataclass(frozen=True)
class ResultFile:
    """One delivered file of a result, local or in the object store: its path within the result, its
    size, and how to read its header (``read_header``'s answer)."""

    relative: str  # posix, e.g. "perfusion/cbf_synthetic/CBF_SYNTHETIC_000.dcm"
    size: int
    header: Callable[[], tuple[SeriesHeader, str, str]]
    where: str  # for the log


def is_delivered(relative: str) -> bool:
    """A file the send stage delivers, by its path within the result (``ResultsLayout.files``' rule)."""
    name = PurePosixPath(relative).name
    return name.endswith(".dcm") and not name.startswith(".")


def derived_series(folder: Path | StoreResult, mask_patient: bool) -> list[DerivedGroup]:
    """Every output series of a result: the files the send stage delivers (``ResultsLayout.files``: the
    1 s series at the top, each perfusion output in its own folder below) grouped by folder and name
    prefix, one header read per group, groups of one SeriesInstanceUID joined. The synthetic series
    comes first, then the others by folder. ``folder``: a results folder, or a result in the object store."""
    if isinstance(folder, StoreResult):
        return folder.derived(mask_patient)
    files = [
        ResultFile(
            path.relative_to(folder).as_posix(), _size(path), partial(read_header, path, mask_patient), str(path)
        )
        for path in ResultsLayout.files(folder)
    ]
    return group_series(files)


def group_series(files: Iterable[ResultFile]) -> list[DerivedGroup]:
    """``derived_series``' grouping, of a result's delivered files from either source."""
    groups: dict[str, list[ResultFile]] = {}
    for file in files:
        relative = PurePosixPath(file.relative)
        prefix = relative.name.split("_")[0]
        key = f"{relative.parent.as_posix()}/{prefix}" if relative.parent != PurePosixPath(".") else prefix
        groups.setdefault(key, []).append(file)
    by_uid: dict[str, DerivedGroup] = {}
    result: list[DerivedGroup] = []
    for key, files_of_group in sorted(groups.items(), key=lambda item: ("/" in item[0], item[0])):
        first = min(files_of_group, key=lambda f: PurePosixPath(f.relative))
        try:
            header, sop_class, series_uid = first.header()
        except Exception as exc:
            log.warning("cannot read %s: %s", first.where, exc)
            header, sop_class, series_uid = SeriesHeader(), "unreadable", ""
        size = sum(f.size for f in files_of_group)
        earlier = by_uid.get(series_uid) if series_uid else None
        if earlier is not None:  # one series written under two prefixes: one row
            joined = DerivedGroup(earlier.prefix, earlier.files + len(files_of_group), earlier.bytes + size,
                                  earlier.header, earlier.sop_class, series_uid)  # fmt: skip
            result[result.index(earlier)] = by_uid[series_uid] = joined
            continue
        group = DerivedGroup(key, len(files_of_group), size, header, sop_class, series_uid)
        result.append(group)
        if series_uid:
            by_uid[series_uid] = group
    return result


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile (a rotation): counted, not sized
        return 0


def figures(folder: Path | StoreResult) -> list[str]:
    """The PNG figures in a results folder and its subfolders, as paths relative to it."""
    if isinstance(folder, StoreResult):
        return folder.figures()
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if p.is_file())
    return found[:MAX_FIGURES]


def guardrail_verdict(folder: Path | StoreResult) -> dict[str, Any] | None:
    return _record_of(folder, VERDICT_FILE)


def motion_record(folder: Path | StoreResult) -> dict[str, Any] | None:
    """The motion stage's record (``motion.json``: every volume's pose and the ones not used)."""
    return _record_of(folder, MOTION_FILE)


def volumes_record(folder: Path | StoreResult) -> dict[str, Any] | None:
    """The perfusion analyses' lesion volumes (``volumes.json``): reported, or withheld and why."""
    record = _record_of(folder, VOLUMES_FILE)
    return record if record is None or "checks" not in record else None  # unreadable: logged, not shown


def _record_of(folder: Path | StoreResult, name: str) -> dict[str, Any] | None:
    return folder.record(name) if isinstance(folder, StoreResult) else _record(folder / name)


def _record(path: Path) -> dict[str, Any] | None:
    try:
        return _parse_record(path.read_bytes(), path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {"summary": f"unreadable: {exc}", "checks": []}


def _parse_record(data: bytes, where: Path | str) -> dict[str, Any]:
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        log.warning("cannot read %s: %s", where, exc)
        return {"summary": f"unreadable: {exc}", "checks": []}


# --- a result in the object store ------------------------------------------------------------------
MAX_LISTED = 10_000  # objects of one result the page lists (the 1 s series of a large study, its outputs)
HEADER_BYTES = 64 * 1024  # a header's ranged GET; once more with HEADER_BYTES_MORE when it holds no series UID
HEADER_BYTES_MORE = 1024 * 1024
MAX_RECORD_BYTES = 8 * 1024 * 1024  # guardrail.json, motion.json, volumes.json
MAX_FIGURE_BYTES = 64 * 1024 * 1024
STORE_TIMEOUT_S = 3.0  # the page's requests to the store (at most the configured timeout_s): it waits for them


class StoreResult:
    """What the page shows of one result in the object store, read lazily: one listing (at most
    ``MAX_LISTED`` objects) when made, the output series' headers, records and figures when asked.

    The first failure to read the store is ``error`` (shown on the page, logged once); every read after it
    is skipped rather than waited for again."""

    def __init__(self, uri: str, results: ObjectResults | None, error: str | None = None) -> None:
        self.uri, self.results = uri, results
        self.error: str | None = error
        self.objects: dict[str, int] = {}  # path within the result -> size, in key order
        self.truncated = False
        self.listed = False
        self._derived: dict[bool, list[DerivedGroup]] = {}
        self._records: dict[str, dict[str, Any] | None] = {}
        self._headers: dict[tuple[str, bool], tuple[SeriesHeader, str, str]] = {}
        self._lock = threading.Lock()  # one reader of the store per result at a time; the others use its answer
        if results is not None and error is None:
            try:
                found, self.truncated = results.objects(uri, MAX_LISTED)
            except (StoreUnavailable, ValueError) as exc:
                self._failed(exc)
            else:
                self.objects, self.listed = dict(found), True
                if self.truncated:
                    log.warning("%s: more than %d objects; the page shows the first %d", uri, MAX_LISTED, MAX_LISTED)

    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = str(exc)
            log.warning("status page: results in the object store could not be read: %s", exc)

    def _read(self, relative: str, **limits: int) -> bytes:
        """One object's bytes (an empty object's without a request: a ranged GET of it is refused)."""
        if self.error is not None or self.results is None:
            raise StoreUnavailable(f"not read: {self.error}")
        if self.objects.get(relative) == 0:
            return b""
        try:
            return self.results.read(self.uri, relative, **limits)
        except StoreUnavailable as exc:
            self._failed(exc)
            raise

    def _header(self, relative: str, mask_patient: bool) -> tuple[SeriesHeader, str, str]:
        key = (relative, mask_patient)
        if key not in self._headers:
            found = read_header(io.BytesIO(self._read(relative, first_bytes=HEADER_BYTES)), mask_patient)
            if not found[2] and self.objects.get(relative, 0) > HEADER_BYTES:  # a longer header than the first read
                found = read_header(io.BytesIO(self._read(relative, first_bytes=HEADER_BYTES_MORE)), mask_patient)
            self._headers[key] = found
        return self._headers[key]

    def derived(self, mask_patient: bool) -> list[DerivedGroup]:
        with self._lock:
            if mask_patient not in self._derived:
                files = [
                    ResultFile(relative, size, partial(self._header, relative, mask_patient), f"{self.uri}/{relative}")
                    for relative, size in self.objects.items()
                    if is_delivered(relative)
                ]
                self._derived[mask_patient] = group_series(files)
            return self._derived[mask_patient]

    def figures(self) -> list[str]:
        return sorted(relative for relative in self.objects if relative.endswith(".png"))[:MAX_FIGURES]

    def figure(self, name: str) -> bytes:
        """One of ``figures()``' PNGs; StoreUnavailable when the store does not answer."""
        if name not in self.figures():
            raise ValueError(f"{name!r} is not a figure of {self.uri}")
        return self._read(name, max_bytes=MAX_FIGURE_BYTES)

    def record(self, name: str) -> dict[str, Any] | None:
        """A JSON record at the top of the result (``_record``'s answer for a local one)."""
        with self._lock:
            if name not in self._records:
                self._records[name] = self._read_record(name)
            return self._records[name]

    def _read_record(self, name: str) -> dict[str, Any] | None:
        if name not in self.objects:
            return None
        where = f"{self.uri}/{name}"
        try:
            return _parse_record(self._read(name, max_bytes=MAX_RECORD_BYTES), where)
        except StoreUnavailable:
            return None  # the page says why (``error``)
        except ValueError as exc:  # larger than a record can be
            log.warning("cannot read %s: %s", where, exc)
            return {"summary": f"unreadable: {exc}", "checks": []}

    def header(self, mask_patient: bool) -> SeriesHeader | None:
        """The header of the result's first DICOM file at its top (``HeaderCache``'s local rule), None
        when there is none or it cannot be read."""
        first = next((r for r in self.objects if "/" not in r and is_delivered(r)), None)
        if first is None:
            return None
        try:
            return self._header(first, mask_patient)[0]
        except StoreUnavailable:
            return None
        except Exception as exc:
            log.warning("cannot read the header of %s/%s: %s", self.uri, first, exc)
            return None


class StoreResults:
    """The results in the object store that pages looked at lately, one ``StoreResult`` per address, kept
    ``ttl_s`` (a recorded result does not change; one that could not be read, ``error_ttl_s``): a job's page
    and its figures cost one listing, and the job list none."""

    def __init__(self, storage: StorageSettings, ttl_s: float = 60, error_ttl_s: float = 10, size: int = 32) -> None:
        self.storage, self.ttl_s, self.error_ttl_s, self.size = storage, ttl_s, error_ttl_s, size
        self._results: ObjectResults | None = None
        self._cache: OrderedDict[str, tuple[float, StoreResult]] = OrderedDict()
        self._lock = threading.Lock()

    def _open(self) -> tuple[ObjectResults | None, str | None]:
        """The page's own client (a shorter timeout than the receiver's: a page waits for it)."""
        settings = self.storage.object_store
        if settings is None:
            return None, "this node has no [storage.object_store] configured"
        if self._results is None:
            timeout = min(settings.timeout_s, STORE_TIMEOUT_S)
            try:
                self._results = ObjectResults(ObjectStore(settings.model_copy(update={"timeout_s": timeout})))
            except (ConfigError, ImportError) as exc:
                return None, str(exc)
        return self._results, None

    def spool_header(self, job: SeriesJob, mask_patient: bool) -> SeriesHeader | None:
        """The source series' header from its first instance in the bucket's spool (a ranged GET of its
        first bytes), for the page of a job with no result yet on a node whose spool is the object store;
        None when the store holds none of it or does not answer (logged)."""
        with self._lock:
            results, _ = self._open()
        if results is None:
            return None
        store = results.store
        try:
            prefix = ObjectSpool.series_key_in(store, SeriesKey(job.study_uid, job.series_uid))
            first = next((o for o in store.list(prefix) if o.key.endswith(".dcm") and o.size > 0), None)
            if first is None:
                return None
            data = store.get(first.key, first_bytes=HEADER_BYTES, max_bytes=HEADER_BYTES)
            return read_header(io.BytesIO(data), mask_patient)[0]
        except InvalidUIDError:  # the receiver spools only valid UIDs: such a job has no spooled files
            return None
        except Exception as exc:  # noqa: BLE001 - the page shows the job without these values
            log.warning("job %d: cannot read its series' header from the object store: %s", job.id, exc)
            return None

    def get(self, uri: str) -> StoreResult:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(uri)
            # read when made: one that failed later (a header, a record) is read again sooner too
            if cached is not None and now < cached[0] + (self.error_ttl_s if cached[1].error else self.ttl_s):
                self._cache.move_to_end(uri)
                return cached[1]
            results, error = self._open()
        result = StoreResult(uri, results, error)  # outside the lock: a slow store holds up only this page
        if error is not None:
            log.warning("status page: results in the object store could not be read: %s", error)
        with self._lock:
            self._cache[uri] = (time.monotonic(), result)
            self._cache.move_to_end(uri)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return result


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
