"""Scale-out on PostgreSQL: two worker processes share one job store and one spool; one is killed
with SIGKILL in the middle of a job; its lease expires, the other finishes it; every result reaches
Orthanc exactly once."""

from __future__ import annotations

import os
import signal
from datetime import datetime

import pydicom
import pytest

from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore, State
from ctp_node.node.shared.spool import SeriesKey, Spool
from tests.integration.node_helpers import (
    cpu_checkpoint,
    node_settings,
    phantom_files,
    start_node_process,
    write_config,
)
from tests.peers import start_orthanc, wait_for
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow
SECONDS, SLICES, SERIES = 13, 8, 3
LEASE_S = 4


def test_two_workers_on_postgres_with_one_killed_mid_job(tmp_path):
    postgres = PostgresServer()
    orthanc = start_orthanc(tmp_path / "orthanc")
    workers = []
    try:
        settings = node_settings(
            tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), orthanc.dicom_port,
            jobs={"database_url": postgres.url, "lease_s": LEASE_S, "heartbeat_s": 1},
        )  # fmt: skip
        config = write_config(tmp_path / "ctp-node.toml", settings)
        store, spool = JobStore(settings.database_url), Spool(settings.storage.spool_dir)
        for seed in range(SERIES):  # three studies already received
            for path in phantom_files(tmp_path / f"study{seed}", duration_s=SECONDS, seed=seed):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                spool.write(SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID), ds.SOPInstanceUID, path.read_bytes())
                store.record_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, "SCANNER")
        assert len(store.queue_quiet_series(0)) == SERIES
        workers = [start_node_process("worker", config, tmp_path / f"worker{i}.log") for i in range(2)]
        audit = AuditLog(settings.storage.audit_log)

        def someone_processing():
            starts = [e for e in audit.read() if e["event"] == "processing"]
            return starts[0] if starts else None

        first = wait_for(someone_processing, what="a worker to start a job")
        victim = next(w for w in workers if first["worker"].endswith(f":{w.pid}"))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        wait_for(lambda: store.read.counts()["done"] == SERIES, timeout_s=300, what="all series done")

        events = audit.read()
        for series_uid in {e["series_uid"] for e in events if e["event"] == "processing"}:
            mine = [e for e in events if e.get("series_uid") == series_uid]
            assert [e["event"] for e in mine].count("processed") == 1  # computed to completion once
            starts = [e for e in mine if e["event"] == "processing"]
            if series_uid == first["series_uid"]:
                # taken over only after the killed worker's lease had expired: never two at a time
                assert len(starts) == 2 and starts[1]["worker"] != first["worker"]
                started_again = datetime.fromisoformat(starts[1]["time"])
                assert (started_again - datetime.fromisoformat(first["time"])).total_seconds() >= LEASE_S - 0.5
        sent = [e for e in events if e["event"] == "sent"]
        assert len(sent) == SERIES and len({e["source_series_uid"] for e in sent}) == SERIES
        assert len(orthanc.get("/series")) == SERIES
        for series_id in orthanc.get("/series"):
            assert len(orthanc.get(f"/series/{series_id}")["Instances"]) == SECONDS * SLICES
        assert all(job.state == State.DONE for job in store.read.jobs())
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()
        orthanc.stop()
        postgres.stop()
