"""Issue 22, multi-host case 2: receivers and workers on separate hosts that share only PostgreSQL and
an S3 object store (SeaweedFS), both on the db host. The series arrives split across two receivers;
the worker that takes the job is killed with SIGKILL in the middle of it; the other worker host takes
it over once the lease has expired and delivers the result to the PACS host (DCMTK storescp, which
keeps every C-STORE it receives as its own file): 0 instances lost, 0 duplicated."""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime

import pydicom
import pytest

from tests.dcmtk import require
from tests.integration.node_helpers import cpu_checkpoint, node_settings, phantom_files
from tests.multihost.db import sql_uid, start_postgres
from tests.multihost.hosts import Network
from tests.multihost.nodes import (
    AE_TITLE,
    DICOM_PORT,
    poll,
    send_split,
    start_node,
    wait_echo,
    write_config,
)
from tests.multihost.s3 import start_seaweed
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY

pytestmark = pytest.mark.slow
SECONDS, SLICES = 13, 8  # 13 s sampled every 4 s: 32 instances in; a 1 s series of 13 x 8 out
LEASE_S = 4
PACS_AE = "PACS"

# Run in the PACS host's mount namespace: (SOPInstanceUID, SeriesInstanceUID) of every file storescp wrote.
READ_DELIVERED = """
import json, pathlib, sys
import pydicom
print(json.dumps([[ds.SOPInstanceUID, ds.SeriesInstanceUID] for ds in
      (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(pathlib.Path(sys.argv[1]).iterdir()))]))
"""


def test_a_worker_killed_mid_job_is_replaced_by_another_host(tmp_path, monkeypatch):
    started = time.monotonic()
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    (series_uid,) = {ds.SeriesInstanceUID for ds in headers}
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    monkeypatch.setenv("CTP_NODE_TEST_S3_KEY", ACCESS_KEY)  # the node processes inherit them
    monkeypatch.setenv("CTP_NODE_TEST_S3_SECRET", SECRET_KEY)

    with Network(tmp_path / "net") as network:
        db_host = network.add_host("db")
        receivers = [network.add_host("recv1"), network.add_host("recv2")]
        workers = [network.add_host("work1"), network.add_host("work2")]
        pacs, scanner = network.add_host("pacs"), network.add_host("scanner")

        postgres = start_postgres(db_host, tmp_path / "postgres.log")
        s3 = start_seaweed(db_host, tmp_path / "weed.log", tmp_path)
        s3.wait_ready(scanner)
        storescp = pacs.run(
            [require("storescp"), "+uf", "-fe", ".dcm", "-aet", PACS_AE, "-od", str(pacs.data_dir), str(DICOM_PORT)],
            tmp_path / "storescp.log",
        )  # fmt: skip
        wait_echo(pacs, storescp, PACS_AE, tmp_path / "storescp.log")

        object_store = {
            "endpoint": s3.endpoint,
            "bucket": BUCKET,
            "access_key_id": {"env": "CTP_NODE_TEST_S3_KEY"},
            "secret_access_key": {"env": "CTP_NODE_TEST_S3_SECRET"},
            "timeout_s": 5,
        }
        destination = {"name": "pacs", "host": pacs.address, "port": DICOM_PORT, "ae_title": PACS_AE}
        procs = {}
        for host in [*receivers, *workers]:
            settings = node_settings(
                host.data_dir, checkpoint, None,
                dicom={"bind_address": host.address, "port": DICOM_PORT, "ae_title": AE_TITLE},
                storage={"object_store": object_store, "check_interval_s": 0.5},
                jobs={"database_url": postgres.url, "lease_s": LEASE_S, "heartbeat_s": 1},
            )  # fmt: skip
            config = write_config(tmp_path / f"{host.name}.toml", settings, destinations=[destination])
            verb = "serve" if host in receivers else "worker"
            procs[host.name] = start_node(host, verb, config, tmp_path / f"{host.name}.log")

        sent = send_split(scanner, receivers, files, tmp_path)
        where = f"series_uid = {sql_uid(series_uid)}"

        def job():
            found = postgres.query(
                scanner,
                "select state, lease_owner, extract(epoch from lease_expires_at), attempts, instances,"
                f" result_dir from series where {where}",
            )
            return found[0] if len(found) == 1 else None

        taken = poll(job, lambda j: j is not None and j[0] == "processing" and j[1], timeout_s=60, interval_s=0.1)
        assert taken and taken[0] == "processing", f"no worker took the job: {taken}; sent {sent}"
        victim = next(w for w in workers if taken[1].endswith(f":{procs[w.name].pid}"))
        survivor = next(w for w in workers if w is not victim)
        victim.kill(procs[victim.name])
        killed_at = time.time()
        at_kill = job()
        assert at_kill[0] == "processing" and not at_kill[5], f"the job was no longer mid-processing: {at_kill}"
        lease_expired_at = float(at_kill[2])  # the killed worker's last heartbeat set it

        finished = poll(job, lambda j: j is not None and j[0] in ("done", "failed"), timeout_s=150, interval_s=0.5)
        deliveries = postgres.query(
            scanner,
            f"select d.state, d.instances_sent from deliveries d join series s on s.id = d.series_id where s.{where}",
        )
        spool_keys = s3.keys(scanner, "spool/")
        result_keys = [k for k in s3.keys(scanner, "results/") if k.endswith(".dcm")]
        read = pacs.exec_in(storescp, [sys.executable, "-c", READ_DELIVERED, str(pacs.data_dir)], timeout_s=120)
        assert read.returncode == 0, read.stderr
        delivered = json.loads(read.stdout)
        audit = survivor.exec_in(procs[survivor.name], ["cat", str(survivor.data_dir / "audit.jsonl")]).stdout
        audit_events = [json.loads(line) for line in audit.splitlines()]
        mine = (series_uid in (e.get("series_uid"), e.get("source_series_uid")) for e in audit_events)
        events = [e for e, is_mine in zip(audit_events, mine, strict=True) if is_mine]
        taken_over = [e for e in events if e["event"] == "processing"]
        sop_uids = [sop for sop, _ in delivered]
        synthetic = [sop for sop, series in delivered if series != series_uid]
        by_series: dict[str, int] = {}
        for _, series in delivered:
            by_series[series] = by_series.get(series, 0) + 1
        counts = (
            f"acknowledged by storescu {[s.acknowledged for s in sent]} of {[s.files for s in sent]} "
            f"(exit {[s.returncode for s in sent]}); spooled in the bucket {len(spool_keys)}; job at the kill "
            f"{at_kill}, at the end {finished}; {victim.name} (pid {procs[victim.name].pid}) killed; "
            f"{survivor.name}'s audit: {[(e['event'], e['time']) for e in events]}; result files in the bucket "
            f"{len(result_keys)}; deliveries {deliveries}; C-STOREs received by the PACS {len(delivered)}, distinct "
            f"SOPInstanceUIDs {len(set(sop_uids))}, in {len(by_series)} series {sorted(by_series.values())}"
        )
        print(counts)

        assert [s.acknowledged for s in sent] == [s.files for s in sent], counts
        assert len(spool_keys) == len(files), counts  # nothing acknowledged and lost
        assert finished[0] == "done", counts
        assert len(taken_over) == 1, counts  # the survivor started it once...
        started_again = datetime.fromisoformat(taken_over[0]["time"]).timestamp()
        assert started_again >= lease_expired_at - 0.5, counts  # ... only after the victim's lease expired
        assert started_again >= killed_at, counts
        assert [e["event"] for e in events].count("processed") == 1, counts
        assert [e["event"] for e in events].count("sent") == 1, counts
        assert deliveries == [["sent", str(len(result_keys))]], counts
        assert len(delivered) == len(set(sop_uids)), counts  # 0 duplicated at the destination
        assert len(delivered) == len(result_keys), counts  # 0 lost: every result file arrived
        assert SECONDS * SLICES in by_series.values() and len(synthetic) == len(delivered), counts
        for host in [*receivers, *workers]:  # the hosts keep nothing outside their own tmpfs
            assert not (host.data_dir.exists() and any(host.data_dir.iterdir())), counts
        for name, proc in procs.items():
            if proc.poll() is None:
                network.hosts[name].stop(proc)
                assert proc.returncode == 0 or name == victim.name, f"{name} exited with {proc.returncode}"
        assert procs[victim.name].returncode == -signal.SIGKILL
    print(f"test time {time.monotonic() - started:.1f} s")
    assert int(finished[4]) == len(files), f"series.instances {finished[4]}, {len(spool_keys)} spooled"
