"""The job store's tables: the schema, defined here only.

Both sides of the store use it: ``ctp_node.node.shared.jobs.JobStore`` (the write side: every state
transition) and ``ctp_node.node.shared.jobs_read.JobQueries`` (the read side: what the status page,
``ctp-node jobs`` and the metrics show). Nothing else imports it (tests/test_import_contract.py: the
web layer and the command line import no table), so a schema change is made in these three modules.
Columns added later must be nullable: ``JobStore`` adds the missing ones to an older store at start.

One table more has a module of its own: ``audit_events``, the audit trail's copy in the store, is
written and read only by ``ctp_node.node.shared.audit`` (``JobStore`` creates it with the others).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

series_table = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("generation", Integer, nullable=False, default=1),
    Column("instances", Integer, nullable=False, default=0),
    Column("calling_ae", String(16), nullable=False, default=""),
    Column("first_received_at", DateTime(timezone=True), nullable=False),
    Column("last_received_at", DateTime(timezone=True), nullable=False),
    Column("queued_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("result_dir", Text),
    Column("result_generation", Integer),
    Column("error", Text),
    Column("processing_s", Float),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("warning", Text),  # e.g. queued incomplete after waiting; kept while the job runs
    Column("guardrail", Text),  # the guardrail's verdict on the result: "pass: ...", "flagged: ...", "fallback: ..."
    # How far the processing attempt under way is (the engine's volume-steps) and when it should end:
    # written by the worker at a bounded rate (``record_progress``), cleared when a worker claims the job.
    Column("progress_done", Integer),
    Column("progress_total", Integer),
    Column("progress_at", DateTime(timezone=True)),
    Column("progress_eta_at", DateTime(timezone=True)),
    UniqueConstraint("study_uid", "series_uid", name="uq_series_uid"),
)

instances_table = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("position", String(64)),  # ImagePositionPatient to 0.01 mm, as x\y\z
    Column("time_key", String(32)),  # TemporalPositionIdentifier (t...) or AcquisitionNumber (a...)
    Column("instance_number", Integer),
    Column("frames", Integer),  # multi-frame instances only
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("series_id", "sop_uid", name="uq_instance"),
)

deliveries_table = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # pending, sent, failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("error", Text),
    Column("sent_at", DateTime(timezone=True)),
    Column("instances_sent", Integer),
    # The last ERROR_HISTORY failed attempts as JSON ([{"at", "attempt", "generation", "error"}], oldest
    # first): ``error`` is only the last one and is cleared once the delivery succeeds.
    Column("error_history", Text),
    UniqueConstraint("series_id", "destination", name="uq_delivery"),
)

sent_instances_table = Table(
    "sent_instances",
    metadata,
    Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"), primary_key=True),
    Column("file", String(512), primary_key=True),  # the file's path within the result folder, as posix
)

# The audit trail (``ctp_node.node.shared.audit``): append-only, one row per record of ``audit.jsonl``,
# from every host. Never updated or deleted by the node; the UIDs are Text (not String(64)) so that no
# record is refused for its length. BIGINT ids on PostgreSQL (a row per instance received outgrows
# 2**31); INTEGER on SQLite, where only that type makes the rowid key.
audit_events_table = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),  # the record's own time, UTC
    Column("event", String(64), nullable=False),  # received, processing, processed, sent, retry, ...
    Column("node_host", Text, nullable=False),  # the node that wrote it (the record's "host" is the peer's)
    Column("study_uid", Text),
    Column("series_uid", Text),  # a "sent" record's source_series_uid
    Column("sop_uid", Text),  # received instances only
    Column("record", Text, nullable=False),  # the whole record as JSON, as the file's line has it
    Index("ix_audit_events_series_time", "series_uid", "time"),
    Index("ix_audit_events_study_time", "study_uid", "time"),
    Index("ix_audit_events_time", "time"),
)
