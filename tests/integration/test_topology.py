"""The compose topology without containers: Orthanc configured from deploy/compose/orthanc.json with
its auto-routing script, PostgreSQL, one receiving node and two workers as local processes. A
perfusion study sent to the PACS comes back from the node as one synthetic series, and is not
routed again."""

from __future__ import annotations

import subprocess

import pytest

from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore, State
from tests.dcmtk import require
from tests.deploy.running import start_deployed_orthanc
from tests.integration.node_helpers import (
    cpu_checkpoint,
    node_settings,
    phantom_files,
    start_node_process,
    write_config,
)
from tests.peers import stop_process, wait_for
from tests.ports import free_port, wait_for_port
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow
SECONDS, SLICES = 13, 8


def test_site_topology_runs_a_study_through(tmp_path):
    postgres = PostgresServer()
    node_port = free_port()
    orthanc = start_deployed_orthanc(tmp_path, node_port)
    processes: list[subprocess.Popen] = []
    try:
        settings = node_settings(
            tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), orthanc.dicom_port,
            dicom={"port": node_port}, jobs={"database_url": postgres.url, "lease_s": 30, "heartbeat_s": 5},
        )  # fmt: skip
        config = write_config(tmp_path / "ctp-node.toml", settings)
        processes.append(start_node_process("serve", config, tmp_path / "serve.log"))
        wait_for_port(node_port, processes[0], "ctp-node serve")
        processes += [start_node_process("worker", config, tmp_path / f"worker{i}.log") for i in range(2)]

        files = phantom_files(tmp_path / "study", duration_s=SECONDS)
        sent = subprocess.run(
            [require("storescu"), "-aet", "CT_SCANNER1", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr

        store = JobStore(settings.database_url)
        wait_for(lambda: store.read.counts()["done"] == 1, timeout_s=300, what="the series done")
        pacs = wait_for(
            lambda: len(found := orthanc.get("/series?expand")) == 2 and found, timeout_s=60, what="result in PACS"
        )
        by_description = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in pacs}
        synthetic = next(s for d, s in by_description.items() if "SYNTHETIC" in d)
        assert len(synthetic["Instances"]) == SECONDS * SLICES
        events = AuditLog(settings.storage.audit_log).read()
        assert [e["event"] for e in events].count("processed") == 1
        assert [e["event"] for e in events].count("sent") == 1
        # The synthetic series is not routed back to the node (it would be ignored there anyway).
        wait_for(lambda: "not routed" in (tmp_path / "orthanc.log").read_text(), timeout_s=30, what="routing log")
        assert len(store.read.jobs()) == 1 and store.read.jobs()[0].state == State.DONE
    finally:
        for proc in processes:
            stop_process(proc)
        orthanc.stop()
        postgres.stop()
