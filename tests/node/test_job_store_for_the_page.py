"""What the job store keeps for the status page (issue 25): delivery error history, no stale next-attempt
times once finished, a processing job's progress, and an older store that gains the new columns."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, inspect, text

from ctp_node.node.shared.jobs import ERROR_HISTORY, JobStore, State, utcnow
from ctp_node.node.work.progress import StoreProgress


@pytest.fixture()
def store(database_url):
    return JobStore(database_url)


def _sending(store: JobStore, series: str = "1.2.3.4", destinations=("pacs",)):
    for _ in range(3):
        store.record_instance("1.2.3", series, "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    job = store.claim("w1", lease_s=60)
    assert store.processed(job.id, "w1", job.generation, "/results/x", 1.0, list(destinations))
    return job


def test_a_delivery_keeps_its_last_errors_after_it_succeeds_and_has_no_next_attempt(store):
    job = _sending(store)
    (delivery,) = store.pending_deliveries(job.id)
    for i in range(ERROR_HISTORY + 2):
        store.delivery_failed(delivery.id, f"association refused ({i})", utcnow() + timedelta(seconds=30))
    (pending,) = store.pending_deliveries(job.id)
    assert len(pending.error_history) == ERROR_HISTORY  # bounded: the oldest dropped
    assert [e["error"] for e in pending.error_history][-1] == f"association refused ({ERROR_HISTORY + 1})"
    assert [e["attempt"] for e in pending.error_history] == list(range(3, ERROR_HISTORY + 3))
    assert store.finish_sending(job.id, "w1") == State.SENDING
    assert store.get(job.id).next_attempt_at is not None  # waiting: the next sending pass is due then

    store.claim("w1", lease_s=60, now=utcnow() + timedelta(seconds=60), sending_only=True)
    store.delivery_sent(delivery.id, 100)
    assert store.finish_sending(job.id, "w1") == State.DONE
    (sent,) = store.deliveries(job.id)
    assert sent.state == "sent" and sent.error is None
    assert sent.next_attempt_at is None, "a sent delivery showed a stale next-attempt time"
    assert len(sent.error_history) == ERROR_HISTORY  # the earlier errors are kept
    assert store.get(job.id).next_attempt_at is None, "a done job showed a stale next-attempt time"


def test_a_job_whose_delivery_gave_up_has_no_next_attempt(store):
    job = _sending(store, destinations=("pacs", "archive"))
    pacs, archive = store.pending_deliveries(job.id)
    store.delivery_failed(archive.id, "refused", utcnow() + timedelta(seconds=30))
    assert store.finish_sending(job.id, "w1") == State.SENDING
    store.claim("w1", lease_s=60, now=utcnow() + timedelta(seconds=60), sending_only=True)
    store.delivery_sent(pacs.id, 10)
    store.delivery_failed(archive.id, "refused again", None)
    assert store.finish_sending(job.id, "w1") == State.FAILED
    failed = store.get(job.id)
    assert failed.next_attempt_at is None and "refused again" in failed.error
    archive_now = [d for d in store.deliveries(job.id) if d.destination == "archive"][0]
    assert [e["error"] for e in archive_now.error_history] == ["refused", "refused again"]


def test_progress_is_recorded_by_the_lease_holder_only_and_cleared_by_the_next_claim(store):
    for _ in range(3):
        store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    job = store.claim("w1", lease_s=60)
    assert not store.record_progress(job.id, "w2", job.generation, 5, 10, 30.0)  # not its lease
    assert not store.record_progress(job.id, "w1", job.generation + 1, 5, 10, 30.0)  # not its generation
    assert store.record_progress(job.id, "w1", job.generation, 5, 10, 30.0)
    now = store.get(job.id)
    assert (now.progress_done, now.progress_total) == (5, 10)
    assert timedelta(seconds=25) < now.progress_eta_at - utcnow() <= timedelta(seconds=30)
    store.failed(job.id, "w1", "OSError: disk full", retry_at=utcnow() - timedelta(seconds=1))
    again = store.claim("w1", lease_s=60)
    assert again.id == job.id and again.progress_done is None and again.progress_eta_at is None


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float | None]] = []

    def record_progress(self, job_id, worker, generation, done, total, eta_s):
        self.calls.append((done, total, eta_s))
        return True


def test_progress_reaches_the_store_at_a_bounded_rate_with_an_eta():
    class Job:
        id, generation = 7, 1

    clock = [100.0]
    recorder = _Recorder()
    reporter = StoreProgress(recorder, Job(), "w1", every_s=5.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    for done in range(1, 1001):  # 1000 network evaluations over 20 s
        clock[0] = 100.0 + done * 0.02
        reporter(done, 1000)
    # The first, one per 5 s, and the last: not one write per evaluation.
    assert 4 <= len(recorder.calls) <= 6 and recorder.calls[0][0] == 1 and recorder.calls[-1][0] == 1000
    done, total, eta = recorder.calls[1]
    assert eta == pytest.approx(0.02 * (total - done), rel=0.01)  # elapsed scaled by the work left
    assert recorder.calls[-1][2] == 0


def test_a_progress_write_that_fails_does_not_fail_the_job(caplog):
    class Broken:
        def record_progress(self, *args):
            raise OSError("database is locked")

    class Job:
        id, generation = 7, 1

    reporter = StoreProgress(Broken(), Job(), "w1", every_s=0)  # type: ignore[arg-type]
    for done in range(1, 4):
        reporter(done, 3)
    assert caplog.text.count("could not record its progress") == 1


def test_a_store_made_before_the_history_and_progress_columns_gains_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    JobStore(url).engine.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:  # the store as an older version left it
        conn.execute(text("ALTER TABLE deliveries DROP COLUMN error_history"))
        for column in ("progress_done", "progress_total", "progress_at", "progress_eta_at"):
            conn.execute(text(f"ALTER TABLE series DROP COLUMN {column}"))
    assert "error_history" not in {c["name"] for c in inspect(engine).get_columns("deliveries")}
    engine.dispose()
    store = JobStore(url)
    job = _sending(store)
    (delivery,) = store.pending_deliveries(job.id)
    store.delivery_failed(delivery.id, "refused", utcnow())
    assert [e["error"] for e in store.deliveries(job.id)[0].error_history] == ["refused"]


def test_the_workers_processor_records_the_engines_progress_in_the_job_store(tmp_path, monkeypatch):
    """The chain the status page relies on: the engine's progress(done, total), through the processor of
    ``make_processor`` and the reporter the worker sets, into the job's row (the first and the last)."""
    from types import SimpleNamespace

    import numpy as np

    import ctp_node.node.work.series_processor as processing
    from ctp_node.node.work.worker import Worker
    from tests.node.worker_helpers import FakeSender, queued_series

    seen: list[tuple[int | None, int | None]] = []
    settings, store = queued_series(tmp_path)

    def run_series(pipeline, files, out_dir, progress):
        for done in range(0, 41):
            progress(done, 40)
            if done == 20:
                job = store.read.jobs()[0]
                seen.append((job.progress_done, job.progress_total))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "a.dcm").write_bytes(b"x")
        derived = SimpleNamespace(count=1)
        return SimpleNamespace(
            derived=derived, synthetic=np.zeros(2), seconds={"total": 1.0}, guardrail=None, warnings=[]
        )

    monkeypatch.setattr(processing, "run_series", run_series)
    processor = processing.make_processor(SimpleNamespace(steps=4), progress=lambda done, total: None)
    Worker(settings, store, processor, sender=FakeSender([0x0000]), worker_id="w1").run_once()
    job = store.read.jobs()[0]
    assert seen == [(0, 40)]  # the first call at once; the next ones within 5 s held back
    assert (job.progress_done, job.progress_total) == (40, 40) and job.state == State.DONE
