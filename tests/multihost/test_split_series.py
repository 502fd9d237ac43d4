"""Issue 22, multi-host case 1: one series split across two receivers on two hosts, one PostgreSQL job
store on a third, the study sent from a fourth (the scanner) -> exactly one job with every instance
in it, queued once the series has been quiet.

Hosts are network namespaces with a private tmpfs per process (tests/multihost/hosts.py): each
receiver's spool is its own, so the only place the two halves meet is the database."""

from __future__ import annotations

import time

import pytest

from tests.multihost.db import sql_uid
from tests.multihost.hosts import Network
from tests.multihost.nodes import (
    overlapped,
    poll,
    send_split,
)
from tests.multihost.site import start_receivers

pytestmark = pytest.mark.slow


def test_a_series_split_across_two_receivers_is_one_job(tmp_path):
    started = time.monotonic()
    with Network(tmp_path / "net") as network:
        site = start_receivers(network, tmp_path)
        files, series_uid, postgres, scanner = site.files, site.series_uid, site.postgres, site.scanner
        receivers, procs, sop_uids = site.hosts, site.procs, set(site.sop_uids)

        # Dealt out in turn (even files to recv1, odd to recv2), both associations at once.
        sent = send_split(scanner, receivers, files, tmp_path)
        spooled = [len(h.files(p, h.data_dir / "spool", "*.dcm")) for h, p in zip(receivers, procs, strict=True)]

        where = f"s.series_uid = {sql_uid(series_uid)}"
        rows = poll(
            lambda: postgres.query(
                scanner,
                "select s.id, s.state, s.instances, extract(epoch from s.queued_at - s.last_received_at),"
                f" (select count(*) from instances i where i.series_id = s.id) from series s where {where}",
            ),
            lambda rows: len(rows) == 1 and rows[0][1] == "queued",
            timeout_s=30,
        )
        recorded = {
            uid
            for (uid,) in postgres.query(
                scanner, f"select i.sop_uid from instances i join series s on s.id = i.series_id where {where}"
            )
        }
        jobs = postgres.query(scanner, "select count(*) from series")[0][0]
        counts = (
            f"sent {len(files)} files ({', '.join(f'{s.files} to {s.receiver}' for s in sent)}); acknowledged by "
            f"storescu {[s.acknowledged for s in sent]} (exit {[s.returncode for s in sent]}); spooled on each "
            f"receiver's own tmpfs {spooled}; series rows {rows} (id, state, instances, s queued after the last "
            f"instance, instance rows); distinct SOPInstanceUIDs recorded {len(recorded)}; series in the store {jobs}"
        )
        print(counts)

        assert overlapped(sent), counts  # both receivers held part of the series at the same time
        assert [s.returncode for s in sent] == [0, 0], counts
        assert [s.acknowledged for s in sent] == [s.files for s in sent], counts
        assert spooled == [s.files for s in sent], counts  # each receiver kept what it acknowledged, only that
        assert not any(any(h.data_dir.iterdir()) for h in receivers if h.data_dir.exists()), counts  # private
        assert len(rows) == 1 and jobs == "1", counts  # exactly one series (one job) for the SeriesInstanceUID
        _, state, instances, queued_after_s, instance_rows = rows[0]
        assert state == "queued", counts
        assert int(instance_rows) == len(files) and recorded == sop_uids, counts
        assert float(queued_after_s) >= site.settings.series.complete_quiet_period_s - 0.05, counts

        for host, proc in zip(receivers, procs, strict=True):
            host.stop(proc)
            assert proc.returncode == 0, f"ctp-node serve on {host.name} exited with {proc.returncode}"
    print(f"test time {time.monotonic() - started:.1f} s")
    # The series' own count agrees with its instance rows (two receivers once raced it: the series row
    # is now locked while a receiver records an instance, tests/node/test_jobs.py).
    assert int(instances) == len(files), f"series.instances {instances}, instance rows {instance_rows}"
