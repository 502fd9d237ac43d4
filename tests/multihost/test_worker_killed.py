"""Issue 22, multi-host case 2: receivers and workers on separate hosts that share only PostgreSQL and
an S3 object store (SeaweedFS), both on the db host. The series arrives split across two receivers;
the worker that takes the job is killed with SIGKILL in the middle of it; the other worker host takes
it over once the lease has expired and delivers the result to the PACS host (DCMTK storescp, which
keeps every C-STORE it receives as its own file): 0 instances lost, 0 duplicated."""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest

from tests.multihost.hosts import Network
from tests.multihost.nodes import poll, send_split
from tests.multihost.site import SECONDS, SLICES, start_site

pytestmark = pytest.mark.slow


def test_a_worker_killed_mid_job_is_replaced_by_another_host(tmp_path, monkeypatch):
    started = time.monotonic()
    with Network(tmp_path / "net") as network:
        site = start_site(network, tmp_path, monkeypatch)
        files, series_uid, procs = site.files, site.series_uid, site.procs
        workers, receivers = site.workers, site.receivers
        sent = send_split(site.scanner, receivers, files, tmp_path)
        job = site.job

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
        deliveries = site.deliveries()
        spool_keys = site.s3.keys(site.scanner, "spool/")
        result_keys = [k for k in site.s3.keys(site.scanner, "results/") if k.endswith(".dcm")]
        delivered = site.delivered_now()
        events = site.audit_of(survivor)
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
