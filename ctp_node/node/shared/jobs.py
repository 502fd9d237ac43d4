"""The job store: one row per received series, one per (series, destination) delivery, with leases.

This module is the write side (``JobStore``: every state transition); what is only read (the status
page, ``ctp-node jobs``, the metrics) is ``ctp_node.node.shared.jobs_read`` (``JobStore.read``), and the
tables are ``ctp_node.node.shared.job_tables``.

SQLite (WAL) by default, embedded in the data folder; PostgreSQL when several machines share the
work (``jobs.database_url = "postgresql+psycopg://..."``), where a worker claims with ``SELECT ...
FOR UPDATE SKIP LOCKED``. Work is at-least-once: a worker that dies leaves a lease that expires and
another worker takes the job over; results are idempotent (deterministic output UIDs), so a repeat
replaces rather than duplicates.

Series states: receiving -> queued -> processing -> sending -> done, or failed (with the reason,
retryable by hand) or ignored (not CTP). An instance arriving after completion re-opens the series
(state receiving, generation + 1): the result is recomputed and replaces the earlier one.

A delivery under way keeps the result files its destination confirmed (table ``sent_instances``, by
path within the result folder) as they are confirmed, so a delivery that stops half way (an
association that drops, a worker that is killed) resends only the rest; a new generation or a resend
starts afresh, and a finished delivery drops them.

Instances are counted by SOPInstanceUID (table ``instances``: a resent instance is one instance),
with the few header facts the completeness check needs (``ctp_node.node.shared.completeness``). A store made
by an older version opens as it is: missing tables are created and missing (nullable) columns
added at start.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, delete, event, func, inspect, select, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from ctp_node.errors import LeaseLost, StoreMissingError
from ctp_node.node.shared.completeness import CompletionPolicy, InstanceFacts, Verdict, judge
from ctp_node.node.shared.job_tables import (
    deliveries_table,
    instances_table,
    metadata,
    sent_instances_table,
    series_table,
)

# The read side's plain data, named here too: the stages that make transitions hold these snapshots.
from ctp_node.node.shared.jobs_read import (
    ACTIVE_STATES,
    Delivery,
    JobQueries,
    SeriesJob,
    State,
    aware,
    parse_history,
    utcnow,
)
from ctp_node.permissions import make_dirs, touch_private

ERROR_HISTORY = 5  # failed attempts kept per delivery: enough to see a pattern, bounded for a peer down for days


NO_PROGRESS: dict[str, Any] = dict.fromkeys(("progress_done", "progress_total", "progress_at", "progress_eta_at"))


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


STORE_HINT = (
    " (a node creates it when it first runs; check storage.data_dir or jobs.database_url:"
    " `ctp-node config` prints the effective ones)"
)


def make_engine(url: str, create: bool = True) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            if not create and not Path(database).is_file():
                raise StoreMissingError(f"no job store at {database}{STORE_HINT}")
            make_dirs(Path(database).parent)
            touch_private(Path(database))  # 0640; SQLite gives its -wal and -shm files the same mode
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            # Let BEGIN IMMEDIATE serialise claimers instead of failing on upgrade.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _upsert_delivery(conn: Connection, job_id: int, destination: str, generation: int) -> None:
    """A pending delivery of ``generation`` to ``destination``, replacing any earlier one."""
    values = {"generation": generation, "state": "pending", "attempts": 0, "next_attempt_at": None, "error": None}
    existing = conn.execute(
        select(deliveries_table.c.id).where(
            deliveries_table.c.series_id == job_id, deliveries_table.c.destination == destination
        )
    ).first()
    if existing is None:
        conn.execute(deliveries_table.insert().values(series_id=job_id, destination=destination, **values))
    else:
        conn.execute(update(deliveries_table).where(deliveries_table.c.id == existing.id).values(**values))
        conn.execute(delete(sent_instances_table).where(sent_instances_table.c.delivery_id == existing.id))


class JobStore:
    """All state transitions of series and deliveries, each one short transaction: the write side.

    What is only shown (the job list, counts, a job with its deliveries) is asked of ``read``
    (``JobQueries``); the few look-ups the stages make between transitions (``get``, ``find``,
    ``deliveries``...) are answered by it too, so each query is written once."""

    def __init__(self, url: str, create: bool = True) -> None:
        """Open (and with ``create``, make) the store; StoreMissingError if ``create`` is off and none exists."""
        self.url = url
        self.engine = make_engine(url, create)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.read = JobQueries(self.engine)  # the read side over the same engine (``ctp_node.node.shared.jobs_read``)
        if not create and not inspect(self.engine).has_table(series_table.name):
            self.engine.dispose()
            raise StoreMissingError(f"no job store at {make_url(url).render_as_string(hide_password=True)}{STORE_HINT}")
        metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns added since the store was made (all nullable), so an older store opens as it is."""
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                assert column.nullable and column.server_default is None, f"{table.name}.{column.name}"
                kind = column.type.compile(dialect=self.engine.dialect)
                try:
                    with self.engine.begin() as conn:
                        conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                except (OperationalError, ProgrammingError):  # another process added it meanwhile
                    present = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
                    if column.name not in present:
                        raise

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- receiving -------------------------------------------------------------------------------
    def record_instance(
        self,
        study_uid: str,
        series_uid: str,
        calling_ae: str,
        at: datetime | None = None,
        count: int = 1,
        instances: Sequence[InstanceFacts] | None = None,
    ) -> None:
        """Record stored instances; a series that had finished re-opens (recomputed later).

        With ``instances`` the series counts distinct SOPInstanceUIDs (a resend is not a new
        instance) and keeps their facts for the completeness check; without, ``count`` is added.
        """
        at = at or utcnow()
        # FOR UPDATE (PostgreSQL; SQLite's writers are serialised anyway): two receivers recording the
        # same series at once would otherwise each count the instance rows they can see and the later
        # UPDATE would overwrite the other's count with a stale one (measured: 137 of 200 series).
        find = (
            select(series_table.c.id, series_table.c.state)
            .where(series_table.c.study_uid == study_uid, series_table.c.series_uid == series_uid)
            .with_for_update()
        )
        with self._tx() as conn:
            row = conn.execute(find).first()
            if row is None:
                # ON CONFLICT DO NOTHING: another receiver (another host, same database) may insert the
                # same series between our SELECT and INSERT; a plain INSERT would then fail this
                # instance's C-STORE on the unique (study, series) key instead of joining the series.
                job_id = conn.execute(
                    self._dialect_insert(series_table)
                    .on_conflict_do_nothing(index_elements=["study_uid", "series_uid"])
                    .returning(series_table.c.id)
                    .values(
                        study_uid=study_uid,
                        series_uid=series_uid,
                        state=State.RECEIVING.value,
                        generation=1,
                        instances=count,
                        calling_ae=calling_ae,
                        first_received_at=at,
                        last_received_at=at,
                        attempts=0,
                        updated_at=at,
                    )
                ).scalar_one_or_none()  # None: the other receiver's row won
                if job_id is not None:
                    if instances is not None:
                        conn.execute(
                            update(series_table)
                            .where(series_table.c.id == job_id)
                            .values(instances=self._upsert_instances(conn, job_id, instances, at))
                        )
                    return
                row = conn.execute(find).one()  # the other receiver's row: this instance joins it
            values: dict[str, Any] = {
                "instances": series_table.c.instances + count
                if instances is None
                else self._upsert_instances(conn, row.id, instances, at),
                "last_received_at": at,
                "updated_at": at,
            }
            if row.state != State.RECEIVING.value:
                # Late instance: re-open. A worker still busy with the old generation will see the
                # generation change and not mark the stale result done.
                values.update(
                    state=State.RECEIVING.value,
                    generation=series_table.c.generation + 1,
                    attempts=0,
                    error=None,
                    warning=None,
                    next_attempt_at=None,
                )
            conn.execute(update(series_table).where(series_table.c.id == row.id).values(**values))

    def _dialect_insert(self, table: Table) -> Any:
        """INSERT with ON CONFLICT clauses (PostgreSQL and SQLite both have them)."""
        if self.is_postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _upsert_instances(self, conn: Connection, job_id: int, instances: Sequence[InstanceFacts], at: datetime) -> int:
        """Insert or refresh the instances' rows (one per SOPInstanceUID); the series' distinct count."""
        latest = {f.sop_uid: f for f in instances}  # a statement may not touch one row twice
        if latest:
            statement = self._dialect_insert(instances_table)
            refreshed = ("position", "time_key", "instance_number", "frames", "received_at")
            statement = statement.on_conflict_do_update(
                index_elements=["series_id", "sop_uid"], set_={k: statement.excluded[k] for k in refreshed}
            )
            conn.execute(
                statement,
                [
                    {
                        "series_id": job_id,
                        "sop_uid": f.sop_uid,
                        "position": f.position,
                        "time_key": f.time_key,
                        "instance_number": f.instance_number,
                        "frames": f.frames,
                        "received_at": at,
                    }
                    for f in latest.values()
                ],
            )
        return conn.execute(
            select(func.count()).select_from(instances_table).where(instances_table.c.series_id == job_id)
        ).scalar_one()

    def add_missing_instances(self, series_uid: str, instances: Sequence[InstanceFacts]) -> int:
        """Facts of instances received before the store kept them (an older version): state untouched.

        Returns how many rows were added."""
        with self._tx() as conn:
            row = conn.execute(select(series_table.c.id).where(series_table.c.series_uid == series_uid)).first()
            if row is None:
                return 0
            known = set(
                conn.execute(select(instances_table.c.sop_uid).where(instances_table.c.series_id == row.id)).scalars()
            )
            new = [f for f in instances if f.sop_uid not in known]
            if new:
                job = conn.execute(select(series_table.c.last_received_at).where(series_table.c.id == row.id)).one()
                count = self._upsert_instances(conn, row.id, new, aware(job.last_received_at))  # type: ignore[arg-type]
                conn.execute(update(series_table).where(series_table.c.id == row.id).values(instances=count))
            return len(new)

    def instance_rows(self, job_id: int) -> int:
        """How many instances the store knows by SOPInstanceUID (0 for a series from an older version)."""
        return self.read.instance_count(job_id)

    def completeness(self, job_id: int, min_time_points: int = 3) -> Verdict:
        """The completeness verdict on a series from its instances' facts (``ctp_node.node.shared.completeness``)."""
        with self._tx() as conn:
            return judge(self._instance_facts(conn, job_id), min_time_points)

    def _instance_facts(self, conn: Connection, job_id: int) -> list[tuple[str | None, str | None, int | None]]:
        """The (position, time_key, frames) of each of the series' instances, as ``judge`` takes them."""
        c = instances_table.c
        return [tuple(r) for r in conn.execute(select(c.position, c.time_key, c.frames).where(c.series_id == job_id))]  # type: ignore[misc]

    def queue_quiet_series(self, policy: CompletionPolicy | float, now: datetime | None = None) -> list[int]:
        """Series with no new instance for long enough become queued, as ``policy`` decides.

        The policy (``ctp_node.node.shared.completeness.CompletionPolicy``) says which wait applies to a
        series, from the verdict on its instances and whether a late instance re-opened it, and the
        warning a series queued incomplete carries; the store only finds the quiet series, hands
        each one's instances to the policy and queues the series whose wait is over. A number:
        quiet for that many seconds, whatever the headers say.
        """
        if not isinstance(policy, CompletionPolicy):
            policy = CompletionPolicy(float(policy))
        now = now or utcnow()
        cutoff = now - timedelta(seconds=policy.shortest_s)
        c = series_table.c
        queued: list[int] = []
        with self._tx() as conn:
            candidates = conn.execute(
                select(c.id, c.generation, c.last_received_at).where(
                    c.state == State.RECEIVING.value, c.last_received_at <= cutoff
                )
            ).all()
            for row in candidates:
                quiet_s = (now - aware(row.last_received_at)).total_seconds()  # type: ignore[operator]
                wait = policy.wait(row.generation, lambda job_id=row.id: self._instance_facts(conn, job_id))
                if quiet_s < wait.seconds:
                    continue
                done = conn.execute(
                    update(series_table)
                    .where(c.id == row.id, c.state == State.RECEIVING.value)
                    .values(
                        state=State.QUEUED.value,
                        queued_at=now,
                        updated_at=now,
                        next_attempt_at=None,
                        warning=wait.warning,
                    )
                ).rowcount
                if done:
                    queued.append(row.id)
        return queued

    # --- working ---------------------------------------------------------------------------------
    def claim(
        self, worker: str, lease_s: float, now: datetime | None = None, *, sending_only: bool = False
    ) -> SeriesJob | None:
        """Take the oldest runnable job: queued, or active with an expired lease, due for an attempt.

        ``sending_only``: only a job whose result waits for delivery (the send stage on its own)."""
        now = now or utcnow()
        c = series_table.c
        unleased = (c.lease_expires_at.is_(None)) | (c.lease_expires_at < now)
        if sending_only:
            waiting = (c.state == State.SENDING.value) & unleased
        else:
            waiting = (c.state == State.QUEUED.value) | (c.state.in_(ACTIVE_STATES) & unleased)
        runnable = waiting & ((c.next_attempt_at.is_(None)) | (c.next_attempt_at <= now))
        query = select(series_table).where(runnable).order_by(c.queued_at, c.id).limit(1)
        if self.is_postgres:
            query = query.with_for_update(skip_locked=True)
        with self._tx() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            state = State.PROCESSING.value if row.state == State.QUEUED.value else row.state
            conn.execute(
                update(series_table)
                .where(c.id == row.id)
                .values(
                    state=state,
                    lease_owner=worker,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=c.attempts + 1,
                    updated_at=now,
                    **NO_PROGRESS,  # an attempt starts from nothing: the last one's progress would mislead
                )
            )
            return self._get(conn, row.id)

    def record_progress(
        self, job_id: int, worker: str, generation: int, done: int, total: int, eta_s: float | None
    ) -> bool:
        """How far the processing attempt under way is (``done`` of ``total`` steps, ``eta_s`` to go).

        Only the worker holding the job's lease records it, and only for the generation it processes;
        False otherwise (nothing changed). The caller bounds the rate (``ctp_node.node.work.progress``)."""
        now = utcnow()
        eta_at = now + timedelta(seconds=eta_s) if eta_s is not None and math.isfinite(eta_s) else None
        c = series_table.c
        with self._tx() as conn:
            done_rows = conn.execute(
                update(series_table)
                .where(
                    c.id == job_id,
                    c.lease_owner == worker,
                    c.generation == generation,
                    c.state == State.PROCESSING.value,
                )
                .values(progress_done=done, progress_total=total, progress_at=now, progress_eta_at=eta_at)
            ).rowcount
        return bool(done_rows)

    def heartbeat(self, job_id: int, worker: str, lease_s: float) -> None:
        """Extend our lease; LeaseLost if another worker has taken the job."""
        now = utcnow()
        with self._tx() as conn:
            done = conn.execute(
                update(series_table)
                .where(
                    series_table.c.id == job_id,
                    series_table.c.lease_owner == worker,
                    series_table.c.state.in_(ACTIVE_STATES),
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
            ).rowcount
        if not done:
            raise LeaseLost(f"job {job_id} is no longer leased to {worker}")

    def processed(
        self,
        job_id: int,
        worker: str,
        generation: int,
        result_dir: str,
        seconds: float,
        destinations: Sequence[str],
        guardrail: str | None = None,
        warning: str | None = None,
    ) -> bool:
        """Record a result (and the guardrail's verdict on it) and move to sending (or done with no destination).

        ``warning``: what the result lacks although it is sent (e.g. outputs that could not be made),
        added to the job's warning unless it already says so (a retried job records it again).
        False when the series was re-opened meanwhile (a newer generation): the stale result is
        not delivered and the series goes through receiving again.
        """
        now = utcnow()
        with self._tx() as conn:
            row = conn.execute(select(series_table).where(series_table.c.id == job_id)).first()
            if row is None or row.lease_owner != worker:
                raise LeaseLost(f"job {job_id} is no longer leased to {worker}")
            if row.generation != generation or row.state != State.PROCESSING.value:
                return False
            next_state = State.SENDING.value if destinations else State.DONE.value
            warned = {}
            if warning and not (row.warning and warning in row.warning):
                warned = {"warning": f"{row.warning}; {warning}" if row.warning else warning}
            conn.execute(
                update(series_table)
                .where(series_table.c.id == job_id)
                .values(
                    **warned,
                    state=next_state,
                    result_dir=result_dir,
                    result_generation=generation,
                    processing_s=seconds,
                    guardrail=guardrail,
                    error=None,
                    updated_at=now,
                    attempts=0,
                    next_attempt_at=None,
                    **({} if destinations else {"lease_owner": None, "lease_expires_at": None}),
                )
            )
            for name in destinations:
                _upsert_delivery(conn, job_id, name, generation)
            return True

    def pending_deliveries(self, job_id: int) -> list[Delivery]:
        return self.read.deliveries(job_id, "pending")

    def deliveries(self, job_id: int) -> list[Delivery]:
        return self.read.deliveries(job_id)

    def confirmed_files(self, delivery_id: int) -> set[str]:
        """The files of this delivery's result that its destination has confirmed (``confirm_files``)."""
        return self.read.confirmed_files(delivery_id)

    def confirm_files(self, delivery_id: int, files: Sequence[str]) -> None:
        """Record files the destination confirmed (stored, or stored with a warning); repeats are ignored.
        Called once per answer while sending: one statement, one short transaction."""
        if self.is_postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        rows = [{"delivery_id": delivery_id, "file": f} for f in dict.fromkeys(files)]
        if rows:
            with self._tx() as conn:
                conn.execute(insert(sent_instances_table).on_conflict_do_nothing(), rows)

    def delivery_sent(self, delivery_id: int, instances: int) -> None:
        """Every file delivered: the confirmations of a partial delivery are no longer needed."""
        now = utcnow()
        with self._tx() as conn:
            conn.execute(delete(sent_instances_table).where(sent_instances_table.c.delivery_id == delivery_id))
            conn.execute(
                update(deliveries_table)
                .where(deliveries_table.c.id == delivery_id)
                .values(
                    state="sent",
                    sent_at=now,
                    error=None,  # the earlier failures stay in error_history
                    next_attempt_at=None,  # a sent delivery has no next attempt (issue 25: a stale time showed)
                    instances_sent=instances,
                    attempts=deliveries_table.c.attempts + 1,
                )
            )

    def delivery_failed(self, delivery_id: int, error: str, retry_at: datetime | None) -> None:
        """A failed send: retry at ``retry_at``, or give up (``None``). The error joins the delivery's
        history (the last ERROR_HISTORY), which outlives a later success."""
        d = deliveries_table.c
        with self._tx() as conn:
            row = conn.execute(select(d.attempts, d.generation, d.error_history).where(d.id == delivery_id)).first()
            if row is None:
                return
            entry = {
                "at": utcnow().isoformat(timespec="seconds"),
                "attempt": row.attempts + 1,
                "generation": row.generation,
                "error": error,
            }
            history = [*parse_history(row.error_history), entry][-ERROR_HISTORY:]
            conn.execute(
                update(deliveries_table)
                .where(d.id == delivery_id)
                .values(
                    state="pending" if retry_at else "failed",
                    error=error,
                    next_attempt_at=retry_at,
                    attempts=d.attempts + 1,
                    error_history=json.dumps(history),
                )
            )

    def finish_sending(self, job_id: int, worker: str) -> State:
        """After a sending pass: done when every delivery went out, failed when one gave up, else wait."""
        now = utcnow()
        with self._tx() as conn:
            rows = [
                Delivery.from_row(r)
                for r in conn.execute(select(deliveries_table).where(deliveries_table.c.series_id == job_id))
            ]
            values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
            if all(d.state == "sent" for d in rows):
                state = State.DONE
                values["next_attempt_at"] = None  # finished: no next attempt (a stale one showed, issue 25)
            elif any(d.state == "failed" for d in rows):
                state = State.FAILED
                values["next_attempt_at"] = None
                values["error"] = "; ".join(f"{d.destination}: {d.error}" for d in rows if d.state == "failed")
            else:
                state = State.SENDING
                pending = [d.next_attempt_at for d in rows if d.state == "pending" and d.next_attempt_at]
                values["next_attempt_at"] = min(pending) if pending else None
            conn.execute(
                update(series_table)
                .where(series_table.c.id == job_id, series_table.c.lease_owner == worker)
                .values(state=state.value, **values)
            )
            return state

    def failed(
        self, job_id: int, worker: str, error: str, *, ignored: bool = False, retry_at: datetime | None = None
    ) -> bool:
        """Processing failed: retry later (back to queued), or failed / ignored with the reason.

        False when ``worker`` no longer holds the job's lease (another worker took it): nothing changed."""
        now = utcnow()
        final = State.IGNORED if ignored else State.FAILED
        state = State.QUEUED.value if retry_at is not None else final.value
        with self._tx() as conn:
            changed = conn.execute(
                update(series_table)
                .where(series_table.c.id == job_id, series_table.c.lease_owner == worker)
                .values(
                    state=state,
                    error=error,
                    next_attempt_at=retry_at,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
        return changed.rowcount > 0

    # --- operating -------------------------------------------------------------------------------
    def _get(self, conn: Connection, job_id: int) -> SeriesJob | None:
        row = conn.execute(select(series_table).where(series_table.c.id == job_id)).first()
        return SeriesJob.from_row(row) if row else None

    def get(self, job_id: int) -> SeriesJob | None:
        return self.read.get(job_id)

    def find(self, series_uid: str) -> SeriesJob | None:
        return self.read.find(series_uid)

    def retry(self, job_id: int) -> None:
        """Process a failed or ignored series again from the spool."""
        now = utcnow()
        with self._tx() as conn:
            conn.execute(
                update(series_table)
                .where(series_table.c.id == job_id)
                .values(
                    state=State.QUEUED.value,
                    attempts=0,
                    error=None,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    queued_at=now,
                    updated_at=now,
                )
            )

    def resend(self, job_id: int, destinations: Sequence[str]) -> None:
        """Send the existing result again (to all or some destinations) without recomputing."""
        now = utcnow()
        with self._tx() as conn:
            row = conn.execute(select(series_table).where(series_table.c.id == job_id)).first()
            if row is None or row.result_dir is None:
                raise ValueError(f"job {job_id} has no result to send; use retry to process it")
            for name in destinations:
                _upsert_delivery(conn, job_id, name, row.result_generation)
            conn.execute(
                update(series_table)
                .where(series_table.c.id == job_id)
                .values(
                    state=State.SENDING.value,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    error=None,
                    updated_at=now,
                )
            )
