"""The job store's read side: what the status page, `ctp-node jobs` and the metrics show, as plain data.

Every query that only looks lives here, over the tables of ``ctp_node.node.shared.job_tables``, and returns
frozen dataclasses (``SeriesJob``, ``Delivery``, ``JobRow``) or plain values, so that the web page,
the command line and the metrics know no table and no SQL: a schema change is made in
``job_tables``, here and in ``ctp_node.node.shared.jobs`` (the write side: every state transition, each one
short transaction), nowhere else. ``JobStore.read`` is this side over the store's own engine.

All times are UTC and timezone-aware (``aware``: SQLite returns naive datetimes).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from ctp_node.node.shared.job_tables import deliveries_table, instances_table, sent_instances_table, series_table

StoreError = SQLAlchemyError
"""What the store raises when its database does not answer (locked, unreachable, its disk full): the
status page answers 503 on it without importing SQLAlchemy itself."""


class State(str, enum.Enum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    IGNORED = "ignored"


ACTIVE_STATES = (State.PROCESSING.value, State.SENDING.value)
FINISHED_STATES = (State.DONE, State.FAILED, State.IGNORED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _row_values(cls: type, row: Any) -> dict[str, Any]:
    """The row's columns named like the dataclass fields, datetimes made timezone-aware."""
    m = row._mapping
    return {f.name: aware(m[f.name]) if isinstance(m[f.name], datetime) else m[f.name] for f in fields(cls)}


@dataclass(frozen=True)
class SeriesJob:
    """A snapshot of one series row."""

    id: int
    study_uid: str
    series_uid: str
    state: State
    generation: int
    instances: int
    calling_ae: str
    first_received_at: datetime
    last_received_at: datetime
    attempts: int
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    result_dir: str | None
    result_generation: int | None
    error: str | None
    processing_s: float | None
    warning: str | None
    guardrail: str | None
    progress_done: int | None = None
    progress_total: int | None = None
    progress_at: datetime | None = None
    progress_eta_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> SeriesJob:
        values = _row_values(cls, row)
        return cls(**{**values, "state": State(values["state"])})


@dataclass(frozen=True)
class Delivery:
    id: int
    series_id: int
    destination: str
    generation: int
    state: str
    attempts: int
    next_attempt_at: datetime | None
    error: str | None
    sent_at: datetime | None
    error_history: tuple[dict[str, Any], ...] = ()  # the last failed attempts, oldest first (ERROR_HISTORY)

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        values = _row_values(cls, row)
        return cls(**(values | {"error_history": parse_history(values["error_history"])}))


def parse_history(text: str | None) -> tuple[dict[str, Any], ...]:
    """A delivery's error history as stored (JSON); an unreadable one is no history rather than no page."""
    if not text:
        return ()
    try:
        entries = json.loads(text)
    except ValueError:
        return ()
    return tuple(e for e in entries if isinstance(e, dict)) if isinstance(entries, list) else ()


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
        finished = job.state in FINISHED_STATES
        total = (self.updated_at - job.first_received_at).total_seconds() if finished else None
        return [
            ("receiving", receiving),
            ("until queued", waiting),
            ("processing", job.processing_s),
            ("in all", total),
        ]


class JobQueries:
    """Read-only queries of the job store; nothing here changes a row."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- one job -----------------------------------------------------------------------------------
    def get(self, job_id: int) -> SeriesJob | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(series_table).where(series_table.c.id == job_id)).first()
        return SeriesJob.from_row(row) if row else None

    def find(self, series_uid: str) -> SeriesJob | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(series_table).where(series_table.c.series_uid == series_uid)).first()
        return SeriesJob.from_row(row) if row else None

    def deliveries(self, job_id: int, state: str | None = None) -> list[Delivery]:
        """The job's deliveries in the order they were made; only those in ``state`` when given."""
        d = deliveries_table.c
        query = select(deliveries_table).where(d.series_id == job_id).order_by(d.id)
        if state is not None:
            query = query.where(d.state == state)
        with self.engine.connect() as conn:
            return [Delivery.from_row(r) for r in conn.execute(query)]

    def confirmed_files(self, delivery_id: int) -> set[str]:
        """The files of a delivery's result that its destination has confirmed (``JobStore.confirm_files``)."""
        c = sent_instances_table.c
        with self.engine.connect() as conn:
            return {r.file for r in conn.execute(select(c.file).where(c.delivery_id == delivery_id))}

    def instance_count(self, job_id: int) -> int:
        """How many instances the store knows by SOPInstanceUID (0 for a series from an older version)."""
        c = instances_table.c
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(instances_table).where(c.series_id == job_id)
            ).scalar_one()

    # --- many jobs ---------------------------------------------------------------------------------
    def jobs(self, states: Sequence[State] = (), limit: int = 100) -> list[SeriesJob]:
        """Newest first, at most ``limit``, only ``states`` when given."""
        return [row.job for row in self._rows(states, None, limit, with_deliveries=False)]

    def counts(self) -> dict[str, int]:
        """Jobs by state, every state named (0 when none)."""
        c = series_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(c.state, func.count()).group_by(c.state))
            return {state.value: 0 for state in State} | {r[0]: r[1] for r in rows}

    def rows(self, states: Sequence[State] = (), limit: int = 100) -> list[JobRow]:
        """The job list of the status page: newest first, at most ``limit``, with each job's deliveries
        (two queries whatever the number of jobs)."""
        return self._rows(states, None, limit)

    def row(self, job_id: int) -> JobRow | None:
        """One job with its times and deliveries; None when there is no such job."""
        rows = self._rows((), job_id, 1)
        return rows[0] if rows else None

    def _rows(
        self, states: Sequence[State], job_id: int | None, limit: int, *, with_deliveries: bool = True
    ) -> list[JobRow]:
        s, d = series_table.c, deliveries_table.c
        query = select(series_table).order_by(s.id.desc()).limit(limit)
        if states:
            query = query.where(s.state.in_([State(state).value for state in states]))
        if job_id is not None:
            query = query.where(s.id == job_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            ids = [r.id for r in rows]
            deliveries: dict[int, list[Delivery]] = {i: [] for i in ids}
            if ids and with_deliveries:
                for r in conn.execute(select(deliveries_table).where(d.series_id.in_(ids)).order_by(d.id)):
                    deliveries[r.series_id].append(Delivery.from_row(r))
        return [
            JobRow(SeriesJob.from_row(r), aware(r.queued_at), aware(r.updated_at), deliveries[r.id])  # type: ignore[arg-type]
            for r in rows
        ]
