"""The audit trail: one JSON line per instance received and per series sent, append-only.

Kept apart from the logs (which rotate and carry debugging detail) so that "what came in and what
went out" can be answered for any series later. Identifiers only: UIDs, AE titles, hosts, counts;
no patient names.

Two copies of each record. The file (``storage.audit_log``, ``audit.jsonl``) is the node's own, on
its own disk; given the job store, ``AuditLog`` also appends the same records to the store's
``audit_events`` table (``ctp_node.node.shared.job_tables``), one INSERT per batch, tagged with the
node's host name. On several hosts (PostgreSQL and an object store; Kubernetes pods whose data
folder is an emptyDir) the table is the one place that holds every host's trail and outlives the
pods: ``audit_events`` here reads it, ``ctp-node jobs audit`` prints it. On one host (SQLite) the
table is written as well, so the command answers the same everywhere. The INSERT is a transaction of
its own, after the receiver's ``record_instance`` commit: one more commit per batch (measured on the
2-core VM, SQLite: about 9 ms per 256-instance batch, some 35 ms over a 960-instance study whose
ingest takes 6-7 s). Folding it into ``record_instance``'s transaction would save that commit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, inspect, select

from ctp_node.node.shared.health import one_line
from ctp_node.node.shared.job_tables import audit_events_table
from ctp_node.permissions import make_dirs, open_new_file

if TYPE_CHECKING:
    from ctp_node.node.shared.jobs import JobStore

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path, store: JobStore | None = None, host: str | None = None) -> None:
        """The trail in the file ``path`` and, with ``store``, in its ``audit_events`` table as well.

        ``host`` names this node in the table (default: ``socket.gethostname()``, a pod's name on
        Kubernetes); a record's own ``host`` field is something else (the calling host of a received
        instance, a destination's host) and stays as it is in the record."""
        self.path = Path(path)
        make_dirs(self.path.parent)
        self.store = store
        self.host = host or socket.gethostname()
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        self.write_many(event, [fields])

    def write_many(self, event: str, records: list[dict[str, Any]]) -> None:
        """One line per record, appended with a single write (one system call for a whole batch), then
        with the job store one row per record, in one INSERT (one transaction for the batch).

        A record's own ``time`` (e.g. when an instance arrived) replaces the time of writing.

        The file comes first (a local append, which needs no network) and a failure to write it
        raises, as it always did. A failure of the job store does not: the records are already in the
        file, so the error is logged (how many records, of which series, and the file that holds them)
        and the caller goes on. Raising would lose more than it keeps: the receiver has acknowledged
        these instances and the worker has sent these series; a caller that fails here would stop
        recording the next ones (the receiver's writer) or retry a job that is done. The file is this
        host's copy, to collect from it in that case (the log line says which host and file)."""
        if not records:
            return
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        whole = [{"time": stamp, "event": event, **fields} for fields in records]
        lines = "".join(json.dumps(record, default=str, sort_keys=True) + "\n" for record in whole)
        with self._lock:
            # O_APPEND: lines from several processes (receiver, workers) never interleave mid-line.
            fd = open_new_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # 0640 whatever the umask
            try:
                data = memoryview(lines.encode())
                while data:  # a regular file takes it in one write; loop only for the rare short write
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
        if self.store is not None:
            self._insert(self.store, event, whole)

    def _insert(self, store: JobStore, event: str, records: list[dict[str, Any]]) -> None:
        """The records as rows of ``audit_events``; a failure is logged, never raised (``write_many``)."""
        try:
            rows = [event_row(record, self.host) for record in records]
            with store.engine.begin() as conn:
                conn.execute(audit_events_table.insert(), rows)
        except Exception as exc:  # noqa: BLE001 - the file holds them: say so, do not stop the caller
            series = sorted({str(uid) for record in records if (uid := series_of(record))})
            log.error(
                "audit trail: %d %r record(s) of series %s are in %s on %s but not in the job store: %s",
                len(records), event, ", ".join(series) or "(none)", self.path, self.host, one_line(exc),
            )  # fmt: skip

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# --- the table -------------------------------------------------------------------------------------


def series_of(record: dict[str, Any]) -> Any:
    """The series a record is about: ``series_uid``, or a ``sent`` record's ``source_series_uid``."""
    return record.get("series_uid") or record.get("source_series_uid")


def utc_time(value: Any) -> datetime | None:
    """An ISO time (or datetime) as a timezone-aware UTC datetime; a naive one is taken as UTC.

    SQLite keeps a datetime without its offset, so every time goes in as UTC to compare rightly."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def event_row(record: dict[str, Any], host: str) -> dict[str, Any]:
    """The ``audit_events`` row of one whole record (its ``time`` and ``event`` included)."""
    return {
        "time": utc_time(record.get("time")) or datetime.now(timezone.utc),
        "event": str(record.get("event", "")),
        "node_host": host,
        "study_uid": _text(record.get("study_uid")),
        "series_uid": _text(series_of(record)),
        "sop_uid": _text(record.get("sop_instance_uid") or record.get("sop_uid")),
        "record": json.dumps(record, default=str, sort_keys=True),
    }


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


class NoAuditTable(LookupError):
    """The job store has no ``audit_events`` table (made by a version before it, and not opened since)."""


@dataclass(frozen=True)
class AuditEvent:
    """One row of ``audit_events``: where and when, and the record as the file has it."""

    id: int
    time: datetime
    event: str
    node_host: str
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    record: dict[str, Any]


def audit_events(
    store: JobStore,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> tuple[list[AuditEvent], int]:
    """The newest ``limit`` events that match, oldest first, and how many match in all.

    ``series_uid`` matches a ``sent`` record's source series too. NoAuditTable if the store has none;
    the store's own error (``jobs_read.StoreError``) if it does not answer."""
    if not inspect(store.engine).has_table(audit_events_table.name):
        raise NoAuditTable(f"the job store has no {audit_events_table.name} table")
    c = audit_events_table.c
    where = []
    if series_uid is not None:
        where.append(c.series_uid == series_uid)
    if study_uid is not None:
        where.append(c.study_uid == study_uid)
    if since is not None:
        where.append(c.time >= utc_time(since))
    newest = select(audit_events_table).where(*where).order_by(c.time.desc(), c.id.desc()).limit(limit)
    counted = select(func.count()).select_from(audit_events_table).where(*where)
    with store.engine.connect() as conn:
        rows = conn.execute(newest).all()
        total = conn.execute(counted).scalar_one()
    events = [
        AuditEvent(
            id=r.id,
            time=utc_time(r.time),  # type: ignore[arg-type]
            event=r.event,
            node_host=r.node_host,
            study_uid=r.study_uid,
            series_uid=r.series_uid,
            sop_uid=r.sop_uid,
            record=_parsed(r.record),
        )
        for r in reversed(rows)
    ]
    return events, total


def _parsed(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"unreadable": text}
    return value if isinstance(value, dict) else {"value": value}
