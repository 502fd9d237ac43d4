"""deploy/bin/ctp-node-rotate-spool against a real (SQLite) job store and data folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from ctp_node.config import StorageSettings
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.results import ResultsLayout
from tests.deploy.tools import DEPLOY

TOOL = DEPLOY / "bin" / "ctp-node-rotate-spool"
DAY = 86400


def _series(data: Path, store: JobStore, n: int, age_days: float, state: State, file_age_days: float | None = None):
    study, series = f"1.2.3.{n}", f"1.2.3.{n}.1"
    result = ResultsLayout.of(StorageSettings(data_dir=data)).generation_dir(study, series, 1)  # where the node writes
    at = utcnow() - timedelta(days=age_days)
    store.record_instance(study, series, "ORTHANC", at=at)
    if state is not State.RECEIVING:
        store.queue_quiet_series(1, now=at + timedelta(seconds=5))
        job = store.claim("w", 300, now=at + timedelta(seconds=6))
        assert job is not None and job.series_uid == series
        if state is State.DONE:
            assert store.processed(job.id, "w", job.generation, str(result), 1.0, [])
        else:
            store.failed(job.id, "w", "test", ignored=state is State.IGNORED)
    assert store.find(series).state is state
    stamp = time.time() - (age_days if file_age_days is None else file_age_days) * DAY
    folders = [data / "spool" / study / series, result]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "x.dcm").write_bytes(b"\0" * 1000)
        os.utime(folder / "x.dcm", (stamp, stamp))
    return folders[0], folders[1].parent


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "ctp-node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    return subprocess.run(
        [sys.executable, str(TOOL), "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


def test_rotates_only_old_finished_series(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = JobStore(f"sqlite:///{data / 'jobs.sqlite'}")
    old_done = _series(data, store, 1, 40, State.DONE)
    new_done = _series(data, store, 2, 5, State.DONE)
    old_failed = _series(data, store, 3, 40, State.FAILED)
    reopened = _series(data, store, 5, 40, State.DONE, file_age_days=0)  # a file arrived today
    old_receiving = _series(data, store, 4, 40, State.RECEIVING)  # last: queueing the others would queue it

    dry = _run(tmp_path, "--days", "30")
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout and all(p.is_dir() for p in old_done), "a dry run deletes nothing"

    run = _run(tmp_path, "--days", "30", "--delete")
    assert run.returncode == 0, run.stderr
    assert not any(p.exists() for p in old_done)
    assert not (data / "spool" / "1.2.3.1").exists(), "the emptied study folder goes too"
    for kept in (*new_done, *old_failed, *old_receiving, *reopened):
        assert kept.is_dir(), kept
    assert "changed after the cut-off" in run.stdout
    # The job history stays.
    assert store.find("1.2.3.1.1").state is State.DONE

    failed_too = _run(tmp_path, "--days", "30", "--delete", "--state", "failed")
    assert failed_too.returncode == 0 and not any(p.exists() for p in old_failed)
    assert all(p.is_dir() for p in old_receiving)


def test_refuses_nonsense(tmp_path):
    assert _run(tmp_path, "--days", "0").returncode == 2
    assert _run(tmp_path, "--days", "30", "--state", "receiving").returncode == 2
