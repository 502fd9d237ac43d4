"""The send stage on its own: delivering a recorded result, never processing; peers and the results layout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from ctp_node.config import Destination
from ctp_node.node.dicom_status import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from ctp_node.node.jobs import State, utcnow
from ctp_node.node.scu import SendResult
from ctp_node.node.send import ResultsLayout, SendStage, find_peer, peer_for
from ctp_node.node.spool import InvalidUIDError, SeriesKey, Spool
from ctp_node.node.worker import ProcessOutput, Worker
from tests.node.dicom_helpers import ct_instance
from tests.node.worker_helpers import KEY, FakeSender
from tests.ports import free_port


def due_now(store):
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")
        conn.exec_driver_sql("UPDATE deliveries SET next_attempt_at = NULL")


def counting_processor(calls):
    def process(job, files, out_dir):
        calls.append(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (out_dir / f"{i}.dcm").write_bytes(b"result")
        return ProcessOutput(out_dir, 2)

    return process


def test_retries_of_sending_never_reprocess(env):
    settings, store = env
    calls = []
    sender = FakeSender([ConnectionError("no association with PACS"), 0xA700, 0x0000])
    worker = Worker(settings, store, counting_processor(calls), sender=sender, worker_id="w1")
    job = worker.run_once()
    for _ in range(2):
        due_now(store)
        assert worker.run_once().id == job.id
    assert store.get(job.id).state == State.DONE and len(sender.sent) == 2
    assert calls == [job.id], "the result was computed once and sent three times"
    assert [d.attempts for d in store.deliveries(job.id)] == [3]


def test_the_send_stage_alone_delivers_a_processed_job_and_leaves_processing_alone(env):
    settings, store = env
    down = FakeSender([ConnectionError("no association with PACS")])
    job = Worker(settings, store, counting_processor([]), sender=down, worker_id="w1").run_once()
    assert store.get(job.id).state == State.SENDING
    # A second series waits to be processed.
    Spool(settings.storage.spool_dir).write(SeriesKey("1.2.3", "1.2.3.5"), "1.2.3.5.1", b"x")
    store.record_instance("1.2.3", "1.2.3.5", "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    # A send stage, with no processor at all, delivers the first once it is due and leaves the second.
    sender = FakeSender([0x0000])
    stage = SendStage(settings, store, sender=sender, worker_id="sender")
    assert stage.run_once() is None, "the delivery is not due before its backoff"
    due_now(store)
    assert stage.run_once().id == job.id
    assert store.get(job.id).state == State.DONE and sender.sent == [("PACS", 2)]
    assert stage.run_once() is None and store.find("1.2.3.5").state == State.QUEUED
    sent = [e for e in stage.audit.read() if e["event"] == "sent"]
    assert [(e["source_series_uid"], e["destination"]) for e in sent] == [(KEY.series_uid, "pacs")]


def test_a_peer_that_answers_fewer_files_than_sent_is_a_failed_send(env):
    settings, store = env

    def cut_off(files, peer, aet):
        return [SendResult(files[0], 0x0000)]  # the association ended after the first file

    job = Worker(settings, store, counting_processor([]), sender=cut_off, worker_id="w1").run_once()
    assert store.deliveries(job.id)[0].error == "1 of 2 instances refused (no response)"
    assert store.get(job.id).state == State.SENDING


def test_a_sender_that_breaks_unexpectedly_is_a_failed_attempt_not_a_crash(env):
    settings, store = env

    def broken(files, peer, aet):
        raise KeyError("AffectedSOPInstanceUID")

    job = Worker(settings, store, counting_processor([]), sender=broken, worker_id="w1").run_once()
    (delivery,) = store.deliveries(job.id)
    assert delivery.state == "pending" and delivery.attempts == 1 and "KeyError" in delivery.error


def test_the_result_lives_where_the_results_layout_says(env):
    settings, store = env
    job = Worker(settings, store, counting_processor([]), sender=FakeSender([0]), worker_id="w1").run_once()
    layout = ResultsLayout.of(settings.storage)
    result_dir = store.get(job.id).result_dir
    assert result_dir == str(layout.generation_dir(KEY.study_uid, KEY.series_uid, 1))
    assert [p.name for p in ResultsLayout.files(result_dir)] == ["0.dcm", "1.dcm"]
    assert layout.series_dir(KEY.study_uid, KEY.series_uid) == settings.storage.results_dir / "1.2.3" / "1.2.3.4"
    with pytest.raises(InvalidUIDError):
        layout.series_dir("1.2.3", "../../etc")


def test_peers_by_name_or_address_and_what_is_wrong_otherwise():
    pacs = Destination(name="pacs", host="10.0.0.5", port=104, ae_title="PACS")
    assert find_peer([pacs], "pacs") == peer_for(pacs) == find_peer([], "10.0.0.5:104:PACS")
    with pytest.raises(ValueError, match=r"neither a configured destination \(pacs\) nor HOST:PORT:AET"):
        find_peer([pacs], "pacs2")
    with pytest.raises(ValueError, match="not a TCP port number"):
        find_peer([pacs], "host:99999:AET")


def test_claiming_for_sending_only_takes_results_waiting_for_delivery(database_url):
    from ctp_node.node.jobs import JobStore

    store = JobStore(database_url)
    earlier = utcnow() - timedelta(seconds=120)
    for series in ("1.2.3.4", "1.2.3.5"):
        store.record_instance("1.2.3", series, "SCANNER", at=earlier)
    store.queue_quiet_series(60)
    assert store.claim("sender", 30, sending_only=True) is None, "queued series are processing work"
    job = store.claim("w1", 30)
    assert store.processed(job.id, "w1", job.generation, "/results/x", 1.0, ["pacs"])
    assert store.claim("sender", 30, sending_only=True) is None, "leased to w1 until its lease expires"
    taken = store.claim("sender", 30, now=utcnow() + timedelta(seconds=31), sending_only=True)
    assert taken is not None and taken.id == job.id and taken.state == State.SENDING
    assert store.claim("sender", 30, now=utcnow() + timedelta(seconds=31), sending_only=True) is None


def test_results_reach_a_real_dicom_peer_and_its_refusals_are_retried_without_reprocessing(env):
    settings, store = env
    port = free_port()
    pacs = Destination(name="pacs", host="127.0.0.1", port=port, ae_title="PEER")
    settings = settings.model_copy(update={"destinations": (pacs,)})
    disk = {"full": True}
    stored = []

    def on_store(event):
        if disk["full"]:
            return STATUS_OUT_OF_RESOURCES
        stored.append(event.request.AffectedSOPInstanceUID)
        return STATUS_SUCCESS

    calls, made = [], []

    def process(job, files, out_dir):
        calls.append(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            made.append(ct_instance(out_dir / f"{i}.dcm", study=KEY.study_uid, series="1.2.3.4.9", value=i))
        return ProcessOutput(out_dir, len(made))

    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        worker = Worker(settings, store, process, worker_id="w1")  # the real sender: C-STORE
        job = worker.run_once()
        (delivery,) = store.deliveries(job.id)
        assert delivery.state == "pending" and delivery.error == "3 of 3 instances refused (0xa700)"
        disk["full"] = False
        due_now(store)
        worker.run_once()
    finally:
        server.shutdown()
    assert store.get(job.id).state == State.DONE
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in made) and calls == [job.id]
