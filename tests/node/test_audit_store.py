"""The audit trail's copy in the job store (table ``audit_events``) and `ctp-node jobs audit`.

On several hosts each pod's audit.jsonl is lost with the pod: the table is the one place that holds
every host's records. The file stays as it was, and a failing database never costs a file line.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, inspect, text
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.node.shared.audit import AuditLog, NoAuditTable, audit_events
from ctp_node.node.shared.job_tables import audit_events_table, metadata, series_table
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import Worker
from tests.cli_output import flat
from tests.integration.node_helpers import node_settings, write_config
from tests.node.worker_helpers import KEY, FakeSender
from tests.ports import free_port

runner = CliRunner()
SERIES, OTHER = "1.2.3.4", "1.2.3.9"


def received(n: int, series: str = SERIES, start: datetime | None = None) -> list[dict]:
    start = start or datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)
    return [
        {
            "time": (start + timedelta(seconds=i)).isoformat(timespec="milliseconds"),
            "study_uid": "1.2.3",
            "series_uid": series,
            "sop_instance_uid": f"{series}.{i}",
            "calling_ae": "SCANNER",
            "host": "10.0.0.7",  # the scanner's address, not the node's
        }
        for i in range(n)
    ]


def test_two_hosts_write_one_trail_and_each_keeps_its_file(database_url, tmp_path):
    """A receiver pod and a worker pod (two AuditLogs, two files) over one job store."""
    store = JobStore(database_url)
    receiver = AuditLog(tmp_path / "receiver" / "audit.jsonl", store, host="receiver-0")
    worker = AuditLog(tmp_path / "worker" / "audit.jsonl", JobStore(database_url), host="worker-7")
    receiver.write_many("received", received(3))
    worker.write("processed", series_uid=SERIES, worker="worker-7:12", generation=1, instances=2)
    worker.write(
        "sent", study_uid="1.2.3", source_series_uid=SERIES, destination="pacs", host="pacs.example", instances=2
    )
    receiver.write_many("received", received(1, OTHER))

    assert [len(receiver.read()), len(worker.read())] == [4, 2]  # the files as before
    events, total = audit_events(store, series_uid=SERIES)
    assert total == 5
    assert [(e.event, e.node_host) for e in events] == [
        *[("received", "receiver-0")] * 3,
        ("processed", "worker-7"),
        ("sent", "worker-7"),  # a sent record names its series source_series_uid
    ]
    first = events[0]
    assert first.time == datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)  # the record's own time
    assert (first.study_uid, first.series_uid, first.sop_uid) == ("1.2.3", SERIES, f"{SERIES}.0")
    assert first.record == receiver.read()[0]  # the whole line, its "host" (the scanner's) included
    assert events[-1].record["host"] == "pacs.example" and events[-1].sop_uid is None
    assert [e.sop_uid for e in audit_events(store, series_uid=OTHER)[0]] == [f"{OTHER}.0"]


def test_a_batch_is_one_transaction_of_one_insert(database_url, tmp_path):
    from sqlalchemy import event

    store = JobStore(database_url)
    statements, commits = [], []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, stmt, *a: statements.append(stmt))
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    AuditLog(tmp_path / "audit.jsonl", store).write_many("received", received(256))
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 1 and "audit_events" in inserts[0]
    assert len(commits) == 1
    assert audit_events(store, limit=10)[1] == 256


def test_without_a_store_only_the_file_is_written(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    AuditLog(tmp_path / "audit.jsonl").write("retry", series_uid=SERIES, job=1)
    assert len(AuditLog(tmp_path / "audit.jsonl").read()) == 1 and audit_events(store)[1] == 0


def test_a_database_failure_keeps_the_file_line_and_logs_an_error(tmp_path, caplog):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    audit = AuditLog(tmp_path / "audit.jsonl", store, host="receiver-0")
    with store.engine.begin() as conn:  # the database refuses the INSERT (a real error, not a mock)
        conn.execute(text("DROP TABLE audit_events"))
    with caplog.at_level(logging.ERROR, logger="ctp_node.node.shared.audit"):
        audit.write_many("received", received(2))  # does not raise: the receiver goes on recording
    assert [r["sop_instance_uid"] for r in audit.read()] == [f"{SERIES}.0", f"{SERIES}.1"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    assert "2 'received' record(s)" in message and SERIES in message
    assert str(tmp_path / "audit.jsonl") in message and "receiver-0" in message and "audit_events" in message


def test_a_file_that_cannot_be_written_still_raises_and_nothing_reaches_the_table(tmp_path):
    """The file comes first: a record the node could not keep locally is not half-written elsewhere."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    audit = AuditLog(tmp_path / "audit.jsonl", store)
    (tmp_path / "audit.jsonl").mkdir()  # a folder where the file should be
    with pytest.raises(OSError):
        audit.write("processed", series_uid=SERIES)
    assert audit_events(store)[1] == 0


def test_a_store_made_before_the_audit_table_gains_it(database_url, tmp_path):
    old = MetaData()
    for table in metadata.sorted_tables:
        if table is not audit_events_table:
            table.to_metadata(old)
    engine = create_engine(database_url)
    old.create_all(engine)
    engine.dispose()
    assert not inspect(create_engine(database_url)).has_table("audit_events")
    store = JobStore(database_url)
    assert inspect(store.engine).has_table("audit_events")
    AuditLog(tmp_path / "audit.jsonl", store).write_many("received", received(2))
    assert audit_events(store)[1] == 2
    JobStore(database_url)  # and again: nothing left to add
    assert audit_events(store)[1] == 2


def test_a_store_made_before_the_audit_table_gains_it_on_sqlite_with_only_its_series_table(tmp_path):
    """The oldest stores had the series table only (tests/node/test_completeness.py)."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    old = MetaData()
    Table("series", old, *[Column(c.name, c.type, primary_key=c.primary_key) for c in series_table.c])
    engine = create_engine(url)
    old.create_all(engine)
    engine.dispose()
    store = JobStore(url, create=False)  # as the command line opens it
    assert inspect(store.engine).has_table("audit_events")


def test_the_worker_writes_its_trail_to_the_store_too(env):
    settings, store = env

    def process(job, files, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "0.dcm").write_bytes(b"result")
        return ProcessOutput(out_dir, 1)

    worker = Worker(settings, store, process, sender=FakeSender([0x0000]), worker_id="w1")
    assert worker.audit.store is store and worker.sending.audit is worker.audit
    worker.run_once()
    events, _ = audit_events(store, series_uid=KEY.series_uid)
    assert [e.event for e in events] == [r["event"] for r in worker.audit.read()]
    assert events[-1].event == "sent" and events[-1].record["destination"] == "pacs"


def test_the_receiver_and_a_send_only_stage_write_to_the_store(tmp_path):
    from ctp_node.node.receive.receiver import Receiver
    from ctp_node.node.work.send_stage import SendStage

    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", None)
    store = JobStore(settings.database_url)
    assert Receiver(settings, store).audit.store is store
    assert SendStage(settings, store).audit.store is store


# --- ctp-node jobs audit ---------------------------------------------------------------------------


@pytest.fixture()
def trail(tmp_path):
    """A configured node whose store holds two series' trails from two hosts."""
    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", 4242)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    store = JobStore(settings.database_url)
    receiver = AuditLog(tmp_path / "a.jsonl", store, host="receiver-0")
    worker = AuditLog(tmp_path / "b.jsonl", store, host="worker-7")
    receiver.write_many("received", received(3))
    receiver.write_many("received", received(2, OTHER, datetime(2026, 12, 7, 9, 0, tzinfo=timezone.utc)))
    worker.write_many(
        "sent",
        [
            {
                "time": "2026-12-07T10:30:00.000+01:00",  # 09:30 UTC
                "study_uid": "1.2.3",
                "source_series_uid": SERIES,
                "destination": "pacs",
                "ae_title": "PACS",
                "instances": 2,
            }
        ],
    )
    return config, store


def invoke(config, *args):
    return runner.invoke(app, ["jobs", "audit", *args, "-c", str(config)])


def test_jobs_audit_filters_by_series_and_prints_json_lines(trail):
    config, _ = trail
    result = invoke(config, "--series", SERIES, "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["event"], r["node_host"]) for r in lines] == [*[("received", "receiver-0")] * 3, ("sent", "worker-7")]
    assert {r.get("series_uid") or r.get("source_series_uid") for r in lines} == {SERIES}
    assert lines[0]["host"] == "10.0.0.7" and lines[-1]["destination"] == "pacs"
    other = invoke(config, "--series", OTHER, "--json")
    assert [json.loads(line)["sop_instance_uid"] for line in other.stdout.splitlines()] == [f"{OTHER}.0", f"{OTHER}.1"]


def test_jobs_audit_table_since_limit_and_study(trail):
    config, _ = trail
    table = invoke(config, "--series", SERIES)
    assert table.exit_code == 0, table.output
    text_out = flat(table.output)
    assert "receiver-0" in text_out and "worker-7" in text_out and "destination=pacs" in text_out
    assert "2026-12-07 09:30:00.000" in text_out and OTHER not in text_out  # the sent line, in UTC
    since = invoke(config, "--since", "2026-12-07T08:30", "--json")  # no offset: UTC
    assert [json.loads(line)["event"] for line in since.stdout.splitlines()] == ["received", "received", "sent"]
    since_offset = invoke(config, "--since", "2026-12-07T09:30+01:00", "--json")  # 08:30 UTC
    assert since_offset.stdout == since.stdout
    newest = invoke(config, "--limit", "2", "--json")
    assert len(newest.stdout.splitlines()) == 2 and "the newest 2 of 6 events" in flat(newest.output)
    assert len(invoke(config, "--study", "1.2.3", "--json").stdout.splitlines()) == 6
    assert "no audit events in the job store that match" in flat(invoke(config, "--study", "9.9").output)
    bad = invoke(config, "--since", "yesterday")
    assert bad.exit_code == 2 and "is not an ISO time" in flat(bad.output)


def test_jobs_audit_on_a_store_made_before_the_audit_table_says_where_the_trail_is(tmp_path):
    """The command opens the store as every command does: an older store gains the (empty) table."""
    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", None)
    old = MetaData()
    for table in metadata.sorted_tables:
        if table is not audit_events_table:
            table.to_metadata(old)
    settings.storage.data_dir.mkdir(parents=True)
    old.create_all(create_engine(settings.database_url))
    result = invoke(write_config(tmp_path / "ctp-node.toml", settings))
    assert result.exit_code == 0, result.output
    assert "no audit events in the job store (records written before this version are only in each" in flat(
        result.output
    )
    assert inspect(create_engine(settings.database_url)).has_table("audit_events")


def test_reading_a_store_without_the_table_is_no_audit_table(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_events"))
    with pytest.raises(NoAuditTable):
        audit_events(store)


def test_jobs_audit_says_when_the_store_does_not_answer(tmp_path):
    url = f"postgresql+psycopg://ctp:secret-password@127.0.0.1:{free_port()}/postgres?connect_timeout=5"
    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", None, jobs={"database_url": url})
    result = invoke(write_config(tmp_path / "ctp-node.toml", settings))
    assert result.exit_code == 2 and "Traceback" not in result.output
    text_out = flat(result.output)
    assert "the job store does not answer" in text_out and "jobs.database_url" in text_out
    assert "secret-password" not in text_out


def test_jobs_audit_against_a_store_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path):
    data = tmp_path / "typo"
    result = invoke(write_config(tmp_path / "ctp-node.toml", node_settings(data, tmp_path / "net.pt", None)))
    assert result.exit_code == 2 and f"no job store at {data / 'jobs.sqlite'}" in flat(result.output)
    assert not data.exists()
