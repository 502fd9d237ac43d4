"""Issue 22, multi-host case 3: the worker that holds a job is cut off the network (``ip link set eth0
down`` in its namespace) while it is inpainting, so that it reaches neither PostgreSQL nor the object
store nor the PACS, and goes on computing. The other worker host takes the job over once the lease has
expired and delivers the result to the PACS host (DCMTK storescp, one file per C-STORE). Then the cut-off
worker's link comes back: its late result must be discarded, that is, not recorded in the job store,
not put in place of the recorded result in the object store, and not delivered (LeaseLost: it logs
"... is no longer leased to ...; another worker owns the job now", process_stage.py / jobs.processed).
Counts: instances acknowledged, stored, processed and delivered; 0 lost, 0 duplicated."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from datetime import datetime

import pytest

from tests.multihost.hosts import Network
from tests.multihost.nodes import poll, send_split
from tests.multihost.site import SECONDS, SLICES, start_site
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY

pytestmark = pytest.mark.slow
# What a worker that lost its lease logs (worker.py / send_stage.py), or a failed attempt of its own.
LEASE_LOST = re.compile(r"is no longer leased to|lease of job \d+ lost")
# Its failed attempt, recorded once the store answers again; or not recorded at all, because by then the
# job store had given the job to another worker (process_stage.record_unrecorded says which).
GAVE_UP = re.compile(
    r"processing series \S+ failed|failed attempt is recorded now|was not recorded: this worker no longer holds"
)

# Run on a client host: every result object of the bucket as [key, ETag, LastModified].
LIST_RESULTS = """
import json, sys
import boto3
from botocore.config import Config
endpoint, access, secret, bucket = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access,
                      aws_secret_access_key=secret,
                      config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                    connect_timeout=2, read_timeout=10))
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="results/")
print(json.dumps([[o["Key"], o["ETag"], o["LastModified"].isoformat()] for p in pages for o in p.get("Contents", ())]))
"""


@pytest.mark.parametrize("frozen", [False, True], ids=["abandons", "late"])
def test_a_worker_cut_off_mid_job_has_its_late_result_discarded(tmp_path, monkeypatch, frozen):
    """``abandons``: the link alone is cut; the tiny CPU network finishes inpainting while the worker is
    still cut off, so it fails to upload and abandons the attempt. ``late``: the worker is also frozen
    (SIGSTOP, as a host that stalls) from the cut until its link is back, so it is still inpainting
    then, finishes with the network back, and must fail to record its result (LeaseLost)."""
    started = time.monotonic()
    with Network(tmp_path / "net") as network:
        site = start_site(network, tmp_path, monkeypatch)
        files, series_uid, procs, s3 = site.files, site.series_uid, site.procs, site.s3
        workers, receivers, scanner = site.workers, site.receivers, site.scanner
        job, audit_of, delivered_now, log_of = site.job, site.audit_of, site.delivered_now, site.log_of
        sent = send_split(scanner, receivers, files, tmp_path)

        def results_now() -> list[list[str]]:
            argv = [sys.executable, "-c", LIST_RESULTS, s3.endpoint, ACCESS_KEY, SECRET_KEY, BUCKET]
            done = scanner.exec(argv, timeout_s=60)
            assert done.returncode == 0, done.stderr
            return sorted(json.loads(done.stdout))

        # A worker holds the lease and is inpainting: its audit says "processing" (written once the
        # series is downloaded, just before the processor runs).
        def inpainting():
            for host in workers:
                if any(e["event"] == "processing" for e in audit_of(host)):
                    return host
            return None

        victim = poll(inpainting, lambda h: h is not None, timeout_s=90, interval_s=0.1)
        taken = job()
        assert victim is not None and taken and taken[0] == "processing", f"no worker took the job: {taken}; {sent}"
        assert taken[1].endswith(f":{procs[victim.name].pid}"), f"{victim.name} is not the lease owner: {taken}"
        survivor = next(w for w in workers if w is not victim)
        victim.link_down()
        if frozen:
            os.kill(procs[victim.name].pid, signal.SIGSTOP)
        cut_at = time.time()
        at_cut = job()
        assert at_cut[0] == "processing" and not at_cut[5], f"the job was no longer mid-processing: {at_cut}"
        lease_expired_at = float(at_cut[2])  # the victim cannot renew it from now on

        finished = poll(job, lambda j: j is not None and j[0] in ("done", "failed"), timeout_s=180, interval_s=0.5)
        survivor_done = time.monotonic()
        delivered_before = delivered_now()
        results_before = results_now()
        victim_log_before = log_of(victim)
        victim.link_up()
        if frozen:
            os.kill(procs[victim.name].pid, signal.SIGCONT)
        assert not LEASE_LOST.search(victim_log_before), f"{victim.name} saw its lease lost while cut off"
        # A frozen worker cannot have given up yet; a running one may have (it cannot upload).
        assert not (frozen and GAVE_UP.search(victim_log_before)), victim_log_before[-3000:]
        up_at = time.monotonic()

        # The cut-off worker finishes (or abandons) its attempt: it must find its lease gone.
        def victim_over() -> str:
            return log_of(victim)[len(victim_log_before) :]

        after = poll(victim_over, lambda t: bool(LEASE_LOST.search(t) or GAVE_UP.search(t)), 240, interval_s=0.5)
        over_at = time.monotonic()
        time.sleep(3)  # anything it would do next (record, upload, send) had its chance to show
        after = victim_over()
        final = job()
        deliveries = site.deliveries()
        spool_keys = s3.keys(scanner, "spool/")
        results_after = results_now()
        delivered = delivered_now()
        survivor_events = audit_of(survivor)
        victim_events = audit_of(victim)
        recorded = final[5].split(f"/{BUCKET}/", 1)[-1] + "/"  # the recorded attempt's key prefix
        result_files = [k for k, _, _ in results_after if k.endswith(".dcm") and k.startswith(recorded)]
        stray = [k for k, _, _ in results_after if not k.startswith(recorded)]
        sop_uids = [sop for sop, _ in delivered]
        synthetic = [sop for sop, series in delivered if series != series_uid]
        by_series: dict[str, int] = {}
        for _, series in delivered:
            by_series[series] = by_series.get(series, 0) + 1
        before = {key: rest for key, *rest in results_before if key.startswith(recorded)}
        now = {key: rest for key, *rest in results_after if key.startswith(recorded)}
        replaced = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
        rewritten = [key for key in replaced if (before.get(key) or [None])[0] != (now.get(key) or [None])[0]]
        processed = [e for e in survivor_events if e["event"] == "processed"]
        counts = (
            f"acknowledged by storescu {[s.acknowledged for s in sent]} of {[s.files for s in sent]} "
            f"(exit {[s.returncode for s in sent]}); stored (spooled in the bucket) {len(spool_keys)}; job at the "
            f"cut {at_cut}, when the survivor finished {finished}, at the end {final}; {victim.name} (pid "
            f"{procs[victim.name].pid}) cut off; processed by {survivor.name}: "
            f"{[e.get('instances') for e in processed]} instances; {survivor.name}'s audit: "
            f"{[(e['event'], e['time']) for e in survivor_events]}; {victim.name}'s audit: "
            f"{[(e['event'], e['time']) for e in victim_events]}; result files in the bucket {len(result_files)}, "
            f"replaced after the link came back {len(replaced)} (other content: {len(rewritten)}, e.g. "
            f"{replaced[:1]}); objects outside the recorded result {len(stray)}; deliveries {deliveries}; "
            f"C-STOREs received by the "
            f"PACS {len(delivered)} ({len(delivered_before)} before the link came back), distinct SOPInstanceUIDs "
            f"{len(set(sop_uids))}, in {len(by_series)} series {sorted(by_series.values())}; {victim.name} after "
            f"the link came back: {[line for line in after.splitlines() if 'WARNING' in line or 'ERROR' in line]}; "
            f"survivor done {survivor_done - started:.1f} s, {victim.name} over {over_at - up_at:.1f} s after the "
            f"link came back"
        )
        print(counts)

        assert [s.acknowledged for s in sent] == [s.files for s in sent], counts
        assert len(spool_keys) == len(files), counts  # nothing acknowledged and lost
        # The survivor took the job over once the lease had expired, and delivered it once.
        assert finished[0] == "done" and final[0] == "done" and final[5] == finished[5], counts
        assert final[1] == "", counts  # no lease left: the late worker did not take the job back
        taken_over = [e for e in survivor_events if e["event"] == "processing"]
        assert len(taken_over) == 1, counts
        started_again = datetime.fromisoformat(taken_over[0]["time"]).timestamp()
        assert started_again >= lease_expired_at - 0.5 and started_again >= cut_at, counts
        assert [e["event"] for e in survivor_events].count("processed") == 1, counts
        assert [e["event"] for e in survivor_events].count("sent") == 1, counts
        # The late result: the cut-off worker found its lease gone (or abandoned its attempt), and
        # neither recorded nor delivered nor stored anything in place of the survivor's result.
        assert LEASE_LOST.search(after) or GAVE_UP.search(after), counts
        if frozen:  # it finished inpainting with the network back: the record refused (jobs.processed)
            assert LEASE_LOST.search(after), counts
        assert "sent" not in [e["event"] for e in victim_events], counts
        assert deliveries == [["sent", str(len(result_files))]], counts
        assert len(delivered) == len(delivered_before), counts  # nothing delivered late
        assert len(delivered) == len(set(sop_uids)), counts  # 0 duplicated at the destination
        assert len(delivered) == len(result_files), counts  # 0 lost: every result file arrived
        assert SECONDS * SLICES in by_series.values() and len(synthetic) == len(delivered), counts
        # Not uploaded over the recorded result either: the object store keeps the survivor's result (each
        # attempt uploads under its own keys and one that could not record removes its own: object_results).
        assert replaced == [], counts
        if frozen:  # it reached the store when it found its lease gone: it removed its own upload
            assert stray == [], counts
        for host in [*receivers, *workers]:  # the hosts keep nothing outside their own tmpfs
            assert not (host.data_dir.exists() and any(host.data_dir.iterdir())), counts
        for name, proc in procs.items():
            if proc.poll() is None:
                network.hosts[name].stop(proc)
                assert proc.returncode == 0, f"{name} exited with {proc.returncode}"
    print(f"test time {time.monotonic() - started:.1f} s")
    assert int(final[4]) == len(files), f"series.instances {final[4]}, {len(spool_keys)} spooled"
