"""The send stage on its own: delivering a recorded result, never processing; peers and the results layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from ctp_node.config import Destination, JobSettings, Settings, StorageSettings
from ctp_node.node.shared.dicom_status import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.shared.spool import InvalidUIDError, SeriesKey, Spool
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.scu import SendResult
from ctp_node.node.work.send_stage import SendStage, find_peer, peer_for
from ctp_node.node.work.worker import Worker
from tests.node.dicom_helpers import ct_instance
from tests.node.worker_helpers import KEY, FakeSender
from tests.peers import wait_for
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


def ct_result_maker(count: int, made: list, calls: list | None = None):
    """A processor whose result is ``count`` small CT instances (paths appended to ``made``; job ids to
    ``calls``), for the tests that deliver by real C-STORE."""

    def process(job, files, out_dir):
        if calls is not None:
            calls.append(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            made.append(ct_instance(out_dir / f"{i}.dcm", study=KEY.study_uid, series="1.2.3.4.9", value=i))
        return ProcessOutput(out_dir, len(made))

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
    from ctp_node.node.shared.jobs import JobStore

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
    process = ct_result_maker(3, made, calls)

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


def test_an_association_dropped_mid_delivery_keeps_what_was_stored_and_the_retry_sends_only_the_rest(env):
    settings, store = env
    port = free_port()
    settings = settings.model_copy(
        update={"destinations": (Destination(name="pacs", host="127.0.0.1", port=port, ae_title="PEER"),)}
    )
    associations: list[list[str]] = []

    def on_open(event):
        associations.append([])

    def on_store(event):
        if len(associations) == 1 and len(associations[0]) == 3:
            event.assoc.abort()  # the first association drops while the 4th instance is in flight
            return STATUS_SUCCESS
        associations[-1].append(event.request.AffectedSOPInstanceUID)
        return STATUS_SUCCESS

    made = []
    process = ct_result_maker(6, made)

    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        worker = Worker(settings, store, process, worker_id="w1")  # the real sender: C-STORE
        job = worker.run_once()
        (delivery,) = store.deliveries(job.id)
        assert delivery.state == "pending" and delivery.error == "3 of 6 instances refused (no response)"
        assert store.confirmed_files(delivery.id) == {"0.dcm", "1.dcm", "2.dcm"}
        due_now(store)
        worker.run_once()
    finally:
        server.shutdown()
    uids = [ds.SOPInstanceUID for ds in made]
    assert associations == [uids[:3], uids[3:]], "the retry sent only the instances that were not confirmed"
    assert store.get(job.id).state == State.DONE
    (delivery,) = store.deliveries(job.id)
    assert delivery.state == "sent" and delivery.attempts == 2
    sent = [e for e in SendStage(settings, store).audit.read() if e["event"] == "sent"]
    assert [e["instances"] for e in sent] == [6]


def test_a_partial_send_is_resumed_and_a_resend_by_hand_starts_afresh(env):
    settings, store = env
    calls = []

    def sender(files, destination, aet):
        calls.append([f.name for f in files])
        if len(calls) == 1:  # the first attempt: the peer confirmed one file, refused nothing, then went away
            return [SendResult(files[0], STATUS_SUCCESS), *(SendResult(f, None) for f in files[1:])]
        return [SendResult(f, STATUS_SUCCESS) for f in files]

    job = Worker(settings, store, counting_processor([]), sender=sender, worker_id="w1").run_once()
    (delivery,) = store.deliveries(job.id)
    assert store.confirmed_files(delivery.id) == {"0.dcm"}
    due_now(store)
    SendStage(settings, store, sender=sender, worker_id="w1").run_once()
    assert calls == [["0.dcm", "1.dcm"], ["1.dcm"]] and store.get(job.id).state == State.DONE
    assert store.confirmed_files(delivery.id) == set(), "kept only while the delivery is under way"
    store.resend(job.id, ["pacs"])  # by hand: everything again
    SendStage(settings, store, sender=sender, worker_id="w1").run_once()
    assert calls[-1] == ["0.dcm", "1.dcm"] and store.get(job.id).state == State.DONE


KILLED_WORKER = """
import sys
from ctp_node.config import Destination, JobSettings, Settings, StorageSettings
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.work.send_stage import SendStage

data_dir, port = sys.argv[1], int(sys.argv[2])
settings = Settings(
    storage=StorageSettings(data_dir=data_dir),
    destinations=(Destination(name="pacs", host="127.0.0.1", port=port, ae_title="PEER"),),
    jobs=JobSettings(lease_s=1, heartbeat_s=0.3),
)
SendStage(settings, JobStore(settings.database_url), worker_id="first").run_once()
"""


def test_a_worker_killed_mid_delivery_is_taken_over_and_resends_only_what_was_not_confirmed(tmp_path):
    # Before the confirmations were recorded, the second worker sent every instance again (issue 23).
    port, n = free_port(), 120
    settings = Settings(
        storage=StorageSettings(data_dir=tmp_path),
        destinations=(Destination(name="pacs", host="127.0.0.1", port=port, ae_title="PEER"),),
        jobs=JobSettings(lease_s=1, heartbeat_s=0.3),
    )
    store = JobStore(settings.database_url)
    store.record_instance(KEY.study_uid, KEY.series_uid, "SCANNER")
    store.queue_quiet_series(0)
    job = store.claim("setup", 0.01)
    result_dir = ResultsLayout.of(settings.storage).generation_dir(KEY.study_uid, KEY.series_uid, job.generation)
    result_dir.mkdir(parents=True)
    made = [
        ct_instance(result_dir / f"{i:03d}.dcm", study=KEY.study_uid, series="1.2.3.4.9", value=i) for i in range(n)
    ]
    assert store.processed(job.id, "setup", job.generation, str(result_dir), 1.0, ["pacs"])
    time.sleep(0.05)  # the setup's lease is over
    stored = []

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.005)
        return STATUS_SUCCESS

    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    first = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(tmp_path), str(port)])
    try:
        wait_for(lambda: len(stored) >= n // 3 or first.poll() is not None, timeout_s=60, what="a third sent")
        assert first.poll() is None, "the first worker ended before it was killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        at_kill = len(stored)
        time.sleep(1.1)  # its lease expires
        assert SendStage(settings, store, worker_id="second").run_once().id == job.id
    finally:
        if first.poll() is None:
            first.kill()
        server.shutdown()
    assert store.get(job.id).state == State.DONE
    assert set(stored) == {ds.SOPInstanceUID for ds in made}
    repeats = len(stored) - n
    # Only what was in flight, or confirmed in the last 20 ms before the kill (_Confirmations.linger_s).
    assert repeats <= 8, f"{repeats} instances sent twice (killed after {at_kill} of {n})"
