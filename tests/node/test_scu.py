"""The C-STORE sender (ctp_node.node.work.scu): pynetdicom's reactor race (issue 23), timeouts, and an
association that ends half way."""

from __future__ import annotations

import logging
import subprocess
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from ctp_node.node.shared.dicom_status import STATUS_SUCCESS
from ctp_node.node.shared.peer import Peer
from ctp_node.node.work import scu
from ctp_node.node.work.scu import SendResult, send_files
from tests.dcmtk import dcmtk
from tests.deploy.tools import missing
from tests.node.dicom_helpers import ct_instance
from tests.peers import stop_process
from tests.ports import free_port, wait_for_port


def ct_files(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = [folder / f"{i:03d}.dcm" for i in range(n)]
    for i, path in enumerate(paths):
        ct_instance(path, study=study, series=series, value=i)
    return paths


@pytest.fixture
def storescp(tmp_path):
    """DCMTK's storescp with its default options on a free loopback port (stopped by PID); in CI
    (CTP_NODE_DEPLOY_CHECKS=required) a missing DCMTK fails the test."""
    binary = dcmtk("storescp")  # DCMTK's, not pynetdicom's Python app of the same name
    if binary is None:
        missing("storescp (DCMTK)", "apt-get install dcmtk")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-od", str(received), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, proc, "storescp", timeout_s=10)
        yield Peer("127.0.0.1", port, "STORESCP"), received
    finally:
        stop_process(proc)


class CPULoad:
    """Busy Python threads for at most ``limit_s``: they take the CPU and the GIL, so that the sender's
    association thread is woken late, which is when pynetdicom 3.0.4 lost C-STORE answers."""

    def __init__(self, threads: int = 2, limit_s: float = 60.0) -> None:
        self.stop = threading.Event()
        deadline = time.monotonic() + limit_s

        def spin() -> None:
            while not self.stop.is_set() and time.monotonic() < deadline:
                sum(range(200))

        self.threads = [threading.Thread(target=spin, daemon=True) for _ in range(threads)]

    def __enter__(self) -> CPULoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_repeated_deliveries_to_storescp_under_cpu_load_lose_no_answer(tmp_path, storescp, caplog):
    # With pynetdicom's own checkpoint (fix_reactor_race a no-op) this failed 5 runs in 5: an answer
    # was lost in the first send or two, the DIMSE timeout (2 s here) expired and the association was
    # aborted. Busy threads take the GIL as well as the CPU, which wakes the association thread late
    # far more often than busy processes do (5 sends in 10 of 488 files failed with two of those).
    peer, received = storescp
    files = ct_files(tmp_path / "files", 40)
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    with CPULoad():
        for _ in range(3):
            results = send_files(files, peer, "CTPNODE", dimse_timeout_s=2.0)
            assert [r.status for r in results] == [STATUS_SUCCESS] * len(files), caplog.text[-2000:]
    assert "unexpected" not in caplog.text
    assert len([p for p in received.iterdir() if p.is_file()]) == len(files)


def test_the_reactor_fix_is_installed_on_this_pynetdicom():
    """A pynetdicom other than the vetted ones fails here: read its reactor again (ctp_node.node.work.scu)."""
    seen = []
    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        client = AE(ae_title="CTPNODE")
        client.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        handlers = [*scu._tuned(5.0), (evt.EVT_CONN_OPEN, lambda e: seen.append(type(e.assoc._reactor_checkpoint)))]
        assoc = client.associate("127.0.0.1", port, ae_title="PEER", evt_handlers=handlers)
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()
    assert seen == [scu._RecheckingCheckpoint]


def test_the_checkpoint_keeps_the_reactor_paused_for_a_request_made_right_after_waking_it():
    """The race without a network: a sender sets the checkpoint and clears it again at once; a plain
    threading.Event lets the woken reactor run beside the next request, the rechecking one does not."""

    class Assoc:
        _is_paused = False

    def collisions(make_checkpoint) -> int:
        assoc = Assoc()
        checkpoint = assoc._reactor_checkpoint = make_checkpoint(assoc)
        in_request, stop, seen = threading.Event(), threading.Event(), []

        def reactor() -> None:  # the lines of pynetdicom's Association._run_reactor that matter
            while not stop.is_set():
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc._is_paused = False
                if in_request.is_set():  # here it would take the request's answer off the queue
                    seen.append(1)

        thread = threading.Thread(target=reactor, daemon=True)
        thread.start()
        for _ in range(300):
            checkpoint.clear()  # as send_c_store does
            while not assoc._is_paused:
                time.sleep(0.0001)
            in_request.set()
            time.sleep(0.0005)  # the request and its answer
            in_request.clear()
            checkpoint.set()
        stop.set()
        thread.join(timeout=5)
        return len(seen)

    assert collisions(lambda assoc: scu._RecheckingCheckpoint(assoc, True)) == 0
    assert collisions(lambda assoc: threading.Event()) > 0, "the plain Event no longer shows the race"


def store_server(port, on_store):
    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def test_an_association_that_drops_half_way_keeps_each_files_result(tmp_path):
    files = ct_files(tmp_path / "files", 5)
    stored, reported = [], []

    def on_store(event):
        if len(stored) == 3:
            event.assoc.abort()  # the peer goes away while the 4th file is in flight
            return STATUS_SUCCESS
        stored.append(event.request.AffectedSOPInstanceUID)
        return STATUS_SUCCESS

    port = free_port()
    server = store_server(port, on_store)
    try:
        results = send_files(files, Peer("127.0.0.1", port, "PEER"), "CTPNODE", dimse_timeout_s=5.0,
                             on_result=reported.append)  # fmt: skip
    finally:
        server.shutdown()
    assert [r.path for r in results] == files
    assert [r.status for r in results] == [STATUS_SUCCESS] * 3 + [None, None]
    assert reported == results[:4], "each answer (or its absence) reported as it came; the 5th was never sent"
    assert [r.ok for r in results].count(True) == len(stored) == 3


def test_the_dimse_timeout_is_the_one_given(tmp_path):
    files = ct_files(tmp_path / "files", 2)

    def slow(event):
        time.sleep(1.5)
        return STATUS_SUCCESS

    port = free_port()
    server = store_server(port, slow)
    try:
        started = time.monotonic()
        results = send_files(files, Peer("127.0.0.1", port, "PEER"), "CTPNODE", dimse_timeout_s=0.5)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
    assert results == [SendResult(files[0], None), SendResult(files[1], None)]
    assert elapsed < 5, "no answer within 0.5 s: aborted, the second file never sent"
