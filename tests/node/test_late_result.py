"""A worker whose lease was taken while it processed (issue 22): its late result is discarded, and
neither the audit trail nor the log says it was processed or recorded.

The lease is taken the way a second host takes it: the job store gives the job to another worker
while the first is still computing (here, from inside the processor)."""

from __future__ import annotations

import logging
from datetime import timedelta

from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import utcnow
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import Worker
from tests.node.worker_helpers import FakeSender, queued_series


def test_a_result_whose_lease_was_taken_is_audited_as_discarded_not_processed(tmp_path, caplog):
    settings, store = queued_series(tmp_path / "data")
    taken = []

    def processor_outlived_by_its_lease(job, files, out_dir):
        taken.append(store.claim("w2", lease_s=60, now=utcnow() + timedelta(seconds=settings.jobs.lease_s + 1)))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "0.dcm").write_bytes(b"result")
        return ProcessOutput(out_dir, 1)

    sender = FakeSender([0x0000])
    worker = Worker(settings, store, processor_outlived_by_its_lease, sender=sender, worker_id="w1")
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        worker.run_once()

    assert taken and taken[0] is not None and taken[0].lease_owner == "w2"
    events = AuditLog(settings.storage.audit_log).read()
    kinds = [e["event"] for e in events]
    assert "processed" not in kinds, kinds
    discarded = [e for e in events if e["event"] == "result discarded"]
    assert len(discarded) == 1 and "lease" in discarded[0]["reason"] and discarded[0]["worker"] == "w1"
    assert sender.sent == []  # nothing delivered by the worker that lost the job
    said = [r.getMessage() for r in caplog.records]
    assert not any("processed again" in m for m in said) and any("another worker owns the job" in m for m in said)
    job = store.get(taken[0].id)
    assert job.lease_owner == "w2" and job.result_dir in (None, "")


def test_a_late_failure_record_of_a_lost_lease_is_not_reported_as_recorded(tmp_path, caplog):
    settings, store = queued_series(tmp_path / "data")
    worker = Worker(settings, store, lambda *a: None, sender=FakeSender([]), worker_id="w1")
    job = store.claim("w1", lease_s=60)
    store.claim("w2", lease_s=60, now=utcnow() + timedelta(seconds=61))  # the lease expired: w2 has it
    worker.processing.unrecorded[job.id] = ("OSError: disk full", None, False)
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        worker.processing.record_unrecorded()

    messages = [r.getMessage() for r in caplog.records]
    assert not any("recorded now" in m for m in messages), messages
    assert any("was not recorded" in m and "no longer holds" in m for m in messages), messages
    assert worker.processing.unrecorded == {}
    assert store.get(job.id).lease_owner == "w2" and store.get(job.id).state.value == "processing"


def test_a_worker_whose_lease_was_taken_leaves_the_recorded_local_result_alone(tmp_path):
    """A single host or a shared results folder: every attempt of a generation publishes to the same
    folder. The late worker must not replace (or remove) what the new lease holder recorded there."""
    settings, store = queued_series(tmp_path / "data")
    layout = ResultsLayout.of(settings.storage)

    def processor_overtaken(job, files, out_dir):
        store.claim("w2", lease_s=60, now=utcnow() + timedelta(seconds=settings.jobs.lease_s + 1))
        recorded = layout.generation_dir(job.study_uid, job.series_uid, job.generation)
        recorded.mkdir(parents=True, exist_ok=True)
        (recorded / "w2.dcm").write_bytes(b"the new lease holder's result")  # what w2 published
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "w1.dcm").write_bytes(b"late")
        return ProcessOutput(out_dir, 1)

    worker = Worker(settings, store, processor_overtaken, sender=FakeSender([0x0000]), worker_id="w1")
    job = worker.run_once()

    folder = layout.generation_dir(job.study_uid, job.series_uid, job.generation)
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".dcm" and p.parent == folder) == ["w2.dcm"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
