"""Back-pressure on the local spool (issue 22 item 4): the disk below its floor, and the job store down,
are answered 0xA700 (out of resources), logged, counted and shown; the node recovers by itself."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.health import ResourceHealth
from ctp_node.node.shared.jobs import JobStore
from tests.integration.node_helpers import node_settings
from tests.peers import stop_process, wait_for
from tests.ports import wait_for_port
from tests.storage.scu import instances, send


def spooled(settings) -> list[Path]:
    return [p for p in settings.storage.spool_dir.rglob("*.dcm") if ".incoming" not in p.parts]


def test_disk_below_its_floor_is_refused_out_of_resources_then_accepted_once_there_is_room(tmp_path, caplog):
    floor_mb = 1 << 30  # a petabyte: this disk is below it
    settings = node_settings(tmp_path / "node", tmp_path / "unused.pt", None, storage={"min_free_mb": floor_mb})
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    try:
        answers = send(settings.dicom.port, instances(tmp_path / "a", 3))
        assert {status for status, _ in answers} == {0xA700}
        assert all("disk below its floor" in comment for _, comment in answers)
        assert spooled(settings) == []
        assert receiver.metrics.refused.labels("disk")._value.get() == 3
        assert receiver.metrics.resource_available.labels("disk")._value.get() == 0
        assert "storage.min_free_mb" in receiver.health.problems()[0]
        # Room again (here: the floor lowered in place of files deleted): accepted at once, no restart.
        receiver.health.min_free_bytes = 1 << 20
        assert [s for s, _ in send(settings.dicom.port, instances(tmp_path / "b", 2))] == [0, 0]
        assert len(spooled(settings)) == 2 and not receiver.health.problems()
        assert receiver.metrics.resource_available.labels("disk")._value.get() == 1
    finally:
        receiver.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("disk unavailable" in m and "refusing instances" in m for m in messages)
    assert any("disk available again" in m for m in messages)


def test_default_floor_leaves_the_local_spool_as_it_was(tmp_path):
    settings = node_settings(tmp_path / "node", tmp_path / "unused.pt", None)
    assert settings.storage.object_store is None and settings.storage.min_free_mb == 256
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    try:
        paths = instances(tmp_path / "a", 2)
        assert [s for s, _ in send(settings.dicom.port, paths)] == [0, 0]
    finally:
        receiver.stop()
    assert len(spooled(settings)) == 2  # <data>/spool/<study>/<series>/<sop>.dcm, as before


def restart_postgres(database, command, timeout_s: float = 30) -> None:
    """Start the stopped server again on its port and data; the old postmaster may still be letting go
    of its lock file and port for a moment, so a start that exits at once is tried again (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(database.folder / "postgres.log", "ab") as log:
            database.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(database.port, database.proc, "PostgreSQL")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_job_store_that_does_not_answer_is_refused_out_of_resources_and_recovers(tmp_path, caplog):
    from tests.postgres import PostgresServer

    database = PostgresServer()
    try:
        settings = node_settings(
            tmp_path / "node", tmp_path / "unused.pt", None,
            storage={"check_interval_s": 0.3}, jobs={"database_url": database.url},
        )  # fmt: skip
        store = JobStore(settings.database_url)
        receiver = Receiver(settings, store)
        receiver.start()
        try:
            series = (generate_uid(), generate_uid())
            assert [s for s, _ in send(settings.dicom.port, instances(tmp_path / "a", 2, series))] == [0, 0]
            receiver.recorder.flush()
            command = database.proc.args
            stop_process(database.proc)
            wait_for(lambda: receiver.health.problems(), timeout_s=30, what="the job store seen down")
            answers = send(settings.dicom.port, instances(tmp_path / "b", 2, series))
            assert {status for status, _ in answers} == {0xA700}
            assert all("job store unavailable" in comment for _, comment in answers)
            assert receiver.metrics.refused.labels("job_store")._value.get() == 2
            # PostgreSQL back on the same port and data: the receiver takes instances again by itself.
            restart_postgres(database, command)
            wait_for(lambda: not receiver.health.problems(), timeout_s=30, what="the job store seen back")
            assert [s for s, _ in send(settings.dicom.port, instances(tmp_path / "c", 2, series))] == [0, 0]
            receiver.recorder.flush()
        finally:
            receiver.stop()
        assert store.find(series[1]).instances == 4  # the acknowledged ones, all recorded
    finally:
        database.stop()
    assert any("job_store unavailable" in r.getMessage() for r in caplog.records)


def test_health_reports_and_recovers_from_a_failing_check():
    state = {"up": False}
    changes: list[tuple[str, bool]] = []

    def probe() -> None:
        if not state["up"]:
            raise ConnectionRefusedError("nothing listens")

    health = ResourceHealth(probes={"object_store": probe}, on_change=lambda n, ok: changes.append((n, ok)))
    assert health.refusal() is None  # unknown until checked: assumed available
    health.check()
    reason, comment = health.refusal()
    assert reason == "object_store" and "nothing listens" in comment
    state["up"] = True
    health.check()
    assert health.refusal() is None
    assert changes == [("object_store", True), ("object_store", False), ("object_store", True)]


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        (
            {"object_store": {"endpoint": "http://127.0.0.1:9000"}},
            "storage.object_store.bucket: required key is missing",
        ),
        ({"object_store": {"endpoint": "ftp://x", "bucket": "b-1"}}, "storage.object_store.endpoint"),
        ({"object_store": {"endpoint": "http://h", "bucket": "Bad_Bucket"}}, "not an S3 bucket name"),
        (
            {"object_store": {"endpoint": "http://h", "bucket": "ctp", "access_key_id": {"env": "K"}}},
            "give both access_key_id and secret_access_key",
        ),
        (
            {"object_store": {"endpoint": "http://h", "bucket": "ctp", "access_key_id": "AKIA..."}},
            "storage.object_store.access_key_id: never a plain value here",
        ),
        ({"min_free_mb": -1}, "storage.min_free_mb"),
    ],
)
def test_bad_storage_settings_name_the_key(tmp_path, storage, message):
    import tomli_w

    from ctp_node.config import load_settings
    from ctp_node.errors import ConfigError

    config = tmp_path / "node.toml"
    config.write_text(tomli_w.dumps({"storage": {"data_dir": str(tmp_path), **storage}}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings(config)
