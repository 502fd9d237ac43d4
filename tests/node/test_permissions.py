"""What the node writes is 0640 (files) / 0750 (folders), whatever the umask of the process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.spool import SeriesKey, Spool
from ctp_node.permissions import DIR_MODE, FILE_MODE, make_dirs


@pytest.fixture(params=[0o022, 0o000, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its permission bits, octal."""
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(root.rglob("*"))}


def test_spool_job_store_and_audit_are_private(tmp_path, umask):
    data = tmp_path / "data" / "deeper"  # folders the node creates, more than one level
    spool = Spool(data / "spool")
    spool.write(SeriesKey("1.2.3", "1.2.3.4"), "1.2.3.4.5", b"instance")
    spool.write(SeriesKey("1.2.3", "1.2.3.4"), "1.2.3.4.5", b"resent")  # replaced
    store = JobStore(f"sqlite:///{data / 'jobs.sqlite'}")
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER")  # the -wal and -shm files exist while the store is open
    AuditLog(data / "audit.jsonl").write("received", series_uid="1.2.3.4")
    found = modes(tmp_path / "data")
    assert {"deeper/jobs.sqlite-wal", "deeper/jobs.sqlite-shm", "deeper/spool/1.2.3/1.2.3.4/1.2.3.4.5.dcm"} <= set(
        found
    )
    expected = {p: oct(DIR_MODE if (tmp_path / "data" / p).is_dir() else FILE_MODE) for p in found}
    assert found == expected
    store.engine.dispose()


def test_existing_folders_keep_their_mode(tmp_path, umask):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    os.chmod(prepared, 0o700)  # e.g. an administrator's or systemd's StateDirectory
    make_dirs(prepared / "spool")
    assert stat.S_IMODE(prepared.stat().st_mode) == 0o700
    assert stat.S_IMODE((prepared / "spool").stat().st_mode) == DIR_MODE
