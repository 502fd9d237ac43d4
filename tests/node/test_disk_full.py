"""The disk fills up while a series is processed (issue 23 item 8): the attempt stops, leaves no partial
result, the worker says why once and backs off while even the job store cannot be written, and once
there is space again the job is queued again with the reason, not left "processing".

The full disk is simulated: the processor's writer raises ENOSPC part-way through a file, and the job
store raises what SQLAlchemy raises for SQLite's "database or disk is full" while ``Space.full``."""

from __future__ import annotations

import errno
import logging
import sqlite3

import pytest
from sqlalchemy.exc import OperationalError

from ctp_node.config import JobSettings
from ctp_node.files import atomic_write, is_disk_full
from ctp_node.node.shared.jobs import State
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import LoopTrouble, Worker
from tests.node.worker_helpers import KEY, FakeSender, queued_series

MAX_BACKOFF_S = 8.0


def due_now(store):
    """Skip the backoff wait: make every waiting job due."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")


def writing(job, files, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "0.dcm").write_bytes(b"result")
    return ProcessOutput(out_dir, 1)


class Space:
    """Whether the disk is full; while it is, the job store's writes fail as SQLite's do."""

    def __init__(self, store, monkeypatch) -> None:
        self.full = False
        self.refused: list[str] = []
        for name in ("claim", "failed", "processed", "heartbeat", "record_progress"):
            monkeypatch.setattr(store, name, self._guard(name, getattr(store, name)))

    def _guard(self, name, method):
        def guarded(*args, **kwargs):
            if self.full:
                self.refused.append(name)
                raise OperationalError("UPDATE series ...", {}, sqlite3.OperationalError("database or disk is full"))
            return method(*args, **kwargs)

        return guarded


class ScriptedStop:
    """A stop event for ``run_forever`` that records each wait instead of sleeping; ``then`` runs
    after the n-th wait (e.g. space comes back), and the loop stops after ``passes`` waits."""

    def __init__(self, passes: int, then: dict) -> None:
        self.waits: list[float] = []
        self.passes, self.then = passes, then

    def is_set(self) -> bool:
        return len(self.waits) >= self.passes

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if len(self.waits) in self.then:
            self.then[len(self.waits)]()
        return self.is_set()


def filling_the_disk(space: Space, written_before_full: int = 3):
    """A processor that writes instances atomically; the disk fills up part-way through one."""

    def process(job, files, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(written_before_full + 2):
            with atomic_write(out_dir / f"CTP1S_{i:04d}.dcm", sync_folder=False) as fh:
                fh.write(b"\0" * 4096)
                if i == written_before_full:
                    space.full = True  # the job store shares the disk
                    raise OSError(errno.ENOSPC, "No space left on device")
        return ProcessOutput(out_dir, written_before_full + 2)

    return process


@pytest.fixture
def node(tmp_path, monkeypatch):
    settings, store = queued_series(tmp_path / "data")
    settings = settings.model_copy(update={"jobs": JobSettings(error_backoff_max_s=MAX_BACKOFF_S)})
    return settings, store, Space(store, monkeypatch)


def test_disk_full_while_processing_stops_cleanly_backs_off_and_requeues_the_job_when_space_returns(node, caplog):
    settings, store, space = node
    worker = Worker(settings, store, filling_the_disk(space), sender=FakeSender([0x0000]), worker_id="w1")
    stop = ScriptedStop(passes=8, then={6: lambda: setattr(space, "full", False)})
    with caplog.at_level(logging.DEBUG, logger="ctp_node"):
        worker.run_forever(stop, idle_s=1.0)

    # Backed off while the store could not be written: doubling from 1 s, capped; then idle again.
    assert stop.waits[:6] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert stop.waits[6:] == [1.0, 1.0], "once the store is back the worker idles as usual"
    # No partial result: neither the generation's folder nor a staging folder nor a temporary file.
    series_dir = ResultsLayout.of(settings.storage).series_dir(KEY.study_uid, KEY.series_uid)
    assert sorted(p.name for p in series_dir.rglob("*")) == []
    # The failed attempt was recorded once space came back: queued again, with the reason.
    job = store.read.jobs()[0]
    assert job.state == State.QUEUED and job.lease_owner is None and job.next_attempt_at is not None
    assert "No space left on device" in job.error and job.attempts == 1
    assert worker.processing.unrecorded == {}
    # Said once: one error line, no traceback, while the store refused 5 more passes.
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(problems) == 1 and "disk is full" in problems[0].getMessage(), [r.getMessage() for r in problems]
    assert not any(r.exc_info for r in caplog.records)
    assert space.refused.count("failed") == 6  # the attempt's record, then the 5 passes that retried it
    assert any("worker resumed" in r.getMessage() for r in caplog.records)
    assert any("recorded now" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)

    # With space, the next attempt writes the whole result and the job is delivered.
    worker.processing.processor = writing
    due_now(store)
    worker.run_once()
    done = store.get(job.id)
    assert done.state == State.DONE
    assert sorted(p.name for p in series_dir.iterdir()) == ["g1"], "the result in place, no staging folder left"


def test_a_job_out_of_attempts_when_the_disk_fills_ends_failed_with_the_reason(node):
    settings, store, space = node
    worker = Worker(settings, store, filling_the_disk(space, written_before_full=0), worker_id="w1")
    for _ in range(settings.jobs.max_attempts):
        stop = ScriptedStop(passes=3, then={2: lambda: setattr(space, "full", False)})
        worker.run_forever(stop, idle_s=1.0)
        due_now(store)
    job = store.read.jobs()[0]
    assert job.state == State.FAILED and "No space left on device" in job.error
    assert job.lease_owner is None and job.attempts == settings.jobs.max_attempts


def test_a_result_the_store_cannot_record_is_a_failed_attempt_not_a_job_stuck_processing(node):
    settings, store, space = node

    def written_then_store_full(job, files, out_dir):
        output = writing(job, files, out_dir)
        space.full = True  # the last write took the last space: the store cannot take the result
        return output

    worker = Worker(settings, store, written_then_store_full, sender=FakeSender([]), worker_id="w1")
    stop = ScriptedStop(passes=3, then={2: lambda: setattr(space, "full", False)})
    worker.run_forever(stop, idle_s=1.0)
    job = store.read.jobs()[0]
    assert job.state == State.QUEUED and "database or disk is full" in job.error
    assert "[SQL:" not in job.error, "the reason is the database's, not SQLAlchemy's statement dump"


def test_disk_full_is_recognised_however_it_arrives():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full")))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("writing the colour map failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")))


def test_other_loop_failures_back_off_too_and_keep_one_traceback(caplog):
    trouble = LoopTrouble(first_s=1.0, max_s=5.0)
    with caplog.at_level(logging.ERROR, logger="ctp_node"):
        delays = [trouble.failed(RuntimeError(f"bug {i}")) for i in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [bool(r.exc_info) for r in caplog.records] == [True], "one traceback for a repeated bug"
    trouble.recovered()
    assert trouble.failed(RuntimeError("again")) == 1.0, "the delay starts over after a pass that succeeded"
