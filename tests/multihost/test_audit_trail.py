"""Issue 22 leftover: the audit trail outlives the hosts that wrote it. One series split across two
receivers on two hosts (each with a private tmpfs data folder, as Kubernetes pods with an emptyDir),
one PostgreSQL job store on a third: once both receivers are gone, with their audit.jsonl, `ctp-node
jobs audit --series` asked from a fourth host still lists every instance received, once each."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.integration.node_helpers import node_settings
from tests.multihost.db import sql_uid
from tests.multihost.hosts import Network
from tests.multihost.nodes import poll, send_split, write_config
from tests.multihost.site import start_receivers

pytestmark = pytest.mark.slow


def test_the_audit_trail_of_two_receivers_outlives_them_in_the_job_store(tmp_path):
    started = time.monotonic()
    with Network(tmp_path / "net") as network:
        site = start_receivers(network, tmp_path)
        files, series_uid, postgres, scanner = site.files, site.series_uid, site.postgres, site.scanner
        receivers, procs, sop_uids, checkpoint = site.hosts, site.procs, site.sop_uids, site.checkpoint

        sent = send_split(scanner, receivers, files, tmp_path)
        where = f"series_uid = {sql_uid(series_uid)} and event = 'received'"
        poll(
            lambda: postgres.query(scanner, f"select count(*) from audit_events where {where}"),
            lambda rows: int(rows[0][0]) >= len(files),
            timeout_s=30,
        )
        # Each file has its lines before the store has its rows (the file is written first).
        in_files = [
            [json.loads(line)["sop_instance_uid"] for line in text.splitlines() if line.strip()]
            for text in (
                h.exec_in(p, ["cat", str(h.data_dir / "audit.jsonl")]).stdout
                for h, p in zip(receivers, procs, strict=True)
            )
        ]
        for host, proc in zip(receivers, procs, strict=True):
            host.stop(proc)  # the receivers go, and their tmpfs with audit.jsonl
            assert proc.returncode == 0, f"ctp-node serve on {host.name} exited with {proc.returncode}"
        assert not any(any(h.data_dir.iterdir()) for h in receivers if h.data_dir.exists())

        # Asked from another host, through the store only (its own data folder: nothing there).
        asking = node_settings(tmp_path / "asking", checkpoint, None, jobs={"database_url": postgres.url})
        config = write_config(tmp_path / "asking.toml", asking)
        command = [
            sys.executable,
            "-m",
            "ctp_node",
            "jobs",
            "audit",
            "--series",
            series_uid,
            "--json",
            "-c",
            str(config),
        ]
        done = scanner.exec(command, timeout_s=120)
        trail = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        counts = (
            f"sent {len(files)} ({', '.join(f'{s.acknowledged} acknowledged by {s.receiver}' for s in sent)}); "
            f"lines in each receiver's audit.jsonl {[len(f) for f in in_files]}; `jobs audit` exit {done.returncode}, "
            f"{len(trail)} events, stderr {done.stderr.strip()[-500:]!r}"
        )
        print(counts)
        assert done.returncode == 0, counts
        assert [s.acknowledged for s in sent] == [s.files for s in sent], counts
        assert sorted(uid for f in in_files for uid in f) == sop_uids, counts  # what the files held
        received = [e for e in trail if e["event"] == "received"]
        assert sorted(e["sop_instance_uid"] for e in received) == sop_uids, counts  # every one, once
        assert {e["calling_ae"] for e in received} == {"CT_SCANNER1"} and all(e["node_host"] for e in received)
    print(f"test time {time.monotonic() - started:.1f} s")
