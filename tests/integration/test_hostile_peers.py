"""The node (`ctp-node serve`, a real process) under hostile and broken peers, on loopback.

Each test fails on the node before issue 11: a 16-byte header claiming 4 GB made it allocate 4 GB;
a connection that sent half a header held a thread and an association slot for ever; one silent
TCP connection to the TLS port stalled every TLS association; instances without a SOP Instance UID,
or whose UIDs differed from the command's, were acknowledged; refusals left no metric.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage

from ctp_node.node.shared.dicom_status import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES
from ctp_node.node.work.scu import fix_reactor_race
from tests.node.dicom_helpers import ct_instance, require, run
from tests.node.running_node import RunningNode, proc_status, read_until_closed
from tests.peers import self_signed_certificate, wait_for, wait_steady

pytestmark = pytest.mark.slow
TIMEOUT_S = 3.0  # the node's network and ACSE timeouts in these tests


class Node(RunningNode):
    def __init__(self, folder: Path, **dicom) -> None:
        super().__init__(folder, TIMEOUT_S, **dicom)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = Node(tmp_path_factory.mktemp("hostile"))
    yield node
    node.stop()


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_a_4gb_length_claim_is_aborted_without_allocating_it(node, pdu_type):
    peak_before = proc_status(node.proc.pid, "VmHWM")
    rss_before = proc_status(node.proc.pid, "VmRSS")
    threads_before = node.threads()
    samples, done = [], threading.Event()

    def sample() -> None:  # VmHWM already holds the peak; this shows it while it happens
        while not done.is_set():
            samples.append(proc_status(node.proc.pid, "VmRSS"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(bytes([pdu_type, 0]) + (2**32 - 1).to_bytes(4, "big") + b"\x00" * 64)
            answer = read_until_closed(sock, 10)
        # the connection's thread has ended: whatever it allocated, the sampler has seen
        wait_for(lambda: node.threads() <= threads_before, 10, "the connection's thread to end")
    finally:
        done.set()
        sampler.join()
    growth_mb = (max(proc_status(node.proc.pid, "VmHWM"), *samples) - max(peak_before, rss_before)) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB"
    assert answer[:1] == b"\x07", answer[:16]  # an A-ABORT before the close
    assert "claims 4294967295 bytes" in node.log.read_text()
    assert node.echo()


def test_stalled_connections_are_closed_within_the_network_timeout(node):
    stalled = []
    for i in range(12):  # more than max_associations (10)
        sock = socket.create_connection(("127.0.0.1", node.port))
        if i % 3 == 1:
            sock.sendall(b"\x01\x00\x00")  # half a PDU header
        elif i % 3 == 2:
            sock.sendall(b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 10)  # a header and 10 of 256 bytes
        stalled.append(sock)
    start = time.monotonic()
    try:
        for sock in stalled:
            read_until_closed(sock, TIMEOUT_S + 10)
        closed_after = time.monotonic() - start
    finally:
        for sock in stalled:
            sock.close()
    assert closed_after < TIMEOUT_S + 1.5, f"closed after {closed_after:.1f} s"
    echoscu = require("echoscu")
    result = run(echoscu, "-to", "5", "-aet", "SCANNER", "-aec", "CTPNODE", "127.0.0.1", str(node.port), timeout=15)
    assert result.returncode == 0, result.stderr


def _store_file(node: RunningNode, path: Path, calling_ae: str = "SCANNER") -> tuple[int, str]:
    """C-STORE the file as it is on disk: the command's UIDs come from its file meta information."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTPNODE")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes, not a re-encoded dataset
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return int(status.Status), str(status.get("ErrorComment", ""))


def _instance(tmp_path: Path, name: str, study: str, series: str, **change) -> Path:
    path = tmp_path / f"{name}.dcm"
    ds = ct_instance(path, study=study, series=series)
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.preamble = b"\x00" * 128  # the file meta (the command's UIDs) stays as first written
    ds.save_as(path, enforce_file_format=False)
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("change", "reason", "comment"),
    [
        ({"SOPInstanceUID": None}, "missing_uid", "no SOPInstanceUID"),
        ({"SOPClassUID": None}, "missing_uid", "no SOPClassUID"),
        ({"SOPInstanceUID": "1.2.3.4.5.6"}, "uid_mismatch", "differs from AffectedSOPInstanceUID"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, "uid_mismatch", "differs from AffectedSOPClassUID"),
        ({"SOPInstanceUID": "1.2.03.x"}, "invalid_uid", "not a valid DICOM UID"),
    ],
)
def test_inconsistent_instance_identity_is_refused_and_counted(node, tmp_path, change, reason, comment):
    study, series = generate_uid(), generate_uid()
    counted = node.metric("ctp_node_refused_instances_total", reason=reason)
    status, error = _store_file(node, _instance(tmp_path, "bad", study, series, **change))
    assert status == STATUS_CANNOT_UNDERSTAND and comment in error
    assert not (node.settings.storage.spool_dir / study).exists()
    assert node.metric("ctp_node_refused_instances_total", reason=reason) == counted + 1
    good = _instance(tmp_path, "good", study, series)
    assert _store_file(node, good) == (0x0000, "")  # the same association settings, a sound instance


def test_out_of_resources_is_refused_and_counted(node, tmp_path):
    study = generate_uid()
    spool = node.settings.storage.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    (spool / study).write_bytes(b"")  # where the study's folder must go: the write fails (even as root)
    counted = node.metric("ctp_node_refused_instances_total", reason="disk")
    status, error = _store_file(node, _instance(tmp_path, "full", study, generate_uid()))
    assert status == STATUS_OUT_OF_RESOURCES and "node cannot store" in error
    assert node.metric("ctp_node_refused_instances_total", reason="disk") == counted + 1


def test_a_silent_connection_does_not_stall_tls_associations(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    node = Node(tmp_path, network_timeout_s=30, acse_timeout_s=30, tls={"certificate": cert, "private_key": key})
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert node.echo(client)
        fds = node.fds()
        with socket.create_connection(("127.0.0.1", node.port)):  # connects, never says hello
            wait_for(lambda: node.fds() > fds, 10, "the node to accept the silent connection")
            start = time.monotonic()
            assert node.echo(client)
            assert time.monotonic() - start < 2.0
        # A handshake that never completes is closed after acse_timeout_s by the connection's own thread.
        with socket.create_connection(("127.0.0.1", node.port)) as silent:
            silent.sendall(b"\x16\x03\x01")  # the start of a ClientHello
            wait_for(lambda: "TLS handshake with 127.0.0.1 failed" in node.log.read_text(), 40, "handshake timeout")
    finally:
        node.stop()


def _received_by_calling_ae(node: RunningNode) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^ctp_node_received_instances_total\{calling_ae="([^"]*)"\} (\S+)$', text, re.MULTILINE)
    return {label: float(value) for label, value in found}


def test_many_calling_ae_titles_keep_the_metrics_bounded(node, tmp_path):
    """Issue 23 item 10: each distinct calling AE title added a label for good (300 titles: /metrics 2.2 ->
    43.9 KB). The first titles keep their own label; the others are counted together."""
    from ctp_node.node.shared.prometheus import MAX_CALLING_AE_LABELS, OTHER_CALLING_AE

    study, series = generate_uid(), generate_uid()
    before = sum(_received_by_calling_ae(node).values())
    titles = [f"PEER{i:03d}" for i in range(MAX_CALLING_AE_LABELS + 8)]
    for title in titles:
        assert _store_file(node, _instance(tmp_path, title, study, series), calling_ae=title) == (0x0000, "")
    wait_for(lambda: sum(_received_by_calling_ae(node).values()) == before + len(titles), 10, "the instances counted")
    labels = _received_by_calling_ae(node)
    assert len(labels) <= MAX_CALLING_AE_LABELS + 1 and labels[OTHER_CALLING_AE] >= 8


# Issue 23 items 1, 2, 3 and 10 (the DICOM parts): stalled and silent connections, oversized instances,
# an over-long Affected SOP Instance UID.

PARTIAL_RQ = b"\x01\x00\x00\x00\x00\xc8" + b"\x00\x01\x00\x00" + b"CTPNODE "  # 18 of 206 bytes, then silence


def _connect(node: RunningNode, source: str = "127.0.0.1", payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10, source_address=(source, 0))
    if payload:
        sock.sendall(payload)
    return sock


def _closed_by_node(sock: socket.socket) -> bool:
    """Whether the node has closed this connection (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(64) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_stalled_association_requests_neither_lock_peers_out_nor_outlive_the_acse_timeout(tmp_path):
    """12 connections that sent part of an A-ASSOCIATE-RQ (more than max_associations) refused every peer
    ("Local Limit Exceeded") and were held for network_timeout_s, not acse_timeout_s."""
    node = Node(tmp_path, network_timeout_s=60, acse_timeout_s=TIMEOUT_S)
    stalled = []
    try:
        # Sockets only, counted once the node is at rest: a file it happens to hold (a log, the spool) or
        # the socket of its readiness check may close after the baseline, and the count never reach +12.
        sockets = wait_steady(lambda: len(_sockets(node)), 30, "the idle node's sockets", samples=10)
        for _ in range(12):
            stalled.append(_connect(node, payload=PARTIAL_RQ))
        wait_for(lambda: len(_sockets(node)) >= sockets + 12, 30, "the node to accept all 12")
        for _ in range(3):  # while all 12 are held
            assert node.echo()
        start = time.monotonic()
        for sock in stalled:
            read_until_closed(sock, TIMEOUT_S + 20)  # far below network_timeout_s (60 s)
        assert time.monotonic() - start < TIMEOUT_S + 20
        assert "no association request within" in node.log.read_text()
        assert node.echo()
    finally:
        for sock in stalled:
            sock.close()
        node.stop()


def _sockets(node: Node) -> list[str]:
    return [target for target in node.open_files() if target.startswith("socket:")]


def test_a_flood_of_silent_connections_neither_locks_peers_out_nor_costs_threads(tmp_path):
    """300 connections that sent nothing: C-ECHO was refused, each held a thread (7 -> 61) and a
    max_associations slot. Pending connections now hold neither, and one host holds at most
    max_connections_per_host of them."""
    node = Node(tmp_path, network_timeout_s=60, acse_timeout_s=60, max_connections_per_host=8)
    silent: list[socket.socket] = []
    try:
        assert node.echo()
        threads = wait_steady(node.threads, 30, "the echo's thread to end")
        for _ in range(300):  # from another loopback address than the echo's
            silent.append(_connect(node, source="127.0.0.2"))
        wait_for(lambda: sum(map(_closed_by_node, silent)) >= 300 - 8, 20, "the node to close the excess")
        for _ in range(3):
            assert node.echo()
        assert node.threads() <= threads + 4, (threads, node.threads())
        # The oldest pending connection from a host makes room for that host's newest: a peer that sends
        # its request at once gets through even from the flooding address.
        assert node.echo(source="127.0.0.2")
        assert "max_connections_per_host" in node.log.read_text()
    finally:
        for sock in silent:
            sock.close()
        node.stop()


def _large_instance(path: Path, side: int, study: str, series: str) -> Path:
    ds = ct_instance(path, study=study, series=series)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(2 * side * side)
    ds.save_as(path, enforce_file_format=True)
    return path


def _store_files(node: RunningNode, paths: list[Path]) -> list[int | None]:
    """C-STORE the files over one association (as they are on disk); None where no answer came."""
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTPNODE")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: list[int | None] = []
    try:
        for path in paths:
            status = assoc.send_c_store(path) if assoc.is_established else None
            statuses.append(int(status.Status) if status is not None and "Status" in status else None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def test_an_instance_over_max_instance_bytes_is_aborted_before_it_is_held_in_memory(tmp_path):
    """One unauthenticated 300 MB C-STORE cost +604 MB of memory; now reading stops at the ceiling."""
    node = Node(tmp_path, max_instance_bytes=2 << 20)
    try:
        study, series = generate_uid(), generate_uid()
        small = [_large_instance(tmp_path / f"ok{i}.dcm", 1000, study, series) for i in range(2)]  # 2.0 MB each
        huge = _large_instance(tmp_path / "huge.dcm", 4096, study, generate_uid())  # 32 MiB
        assert _store_files(node, small) == [0x0000, 0x0000]  # the count starts again with each instance
        wait_steady(lambda: (node.threads(), node.fds()), 30, "the associations to end")
        peak_before = max(proc_status(node.proc.pid, "VmHWM"), proc_status(node.proc.pid, "VmRSS"))
        assert _store_files(node, [huge]) == [None]  # A-ABORT
        growth_mb = (proc_status(node.proc.pid, "VmHWM") - peak_before) / 1024
        assert growth_mb < 20, f"peak RSS grew by {growth_mb:.0f} MB for a 32 MiB instance"
        assert "max_instance_bytes" in node.log.read_text()
        wait_for(lambda: node.metric("ctp_node_refused_instances_total", reason="too_large") == 1, 10, "the count")
        assert len(list(node.settings.storage.spool_dir.rglob("*.dcm"))) == 2
        assert node.echo()
    finally:
        node.stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_over_long_affected_sop_instance_uid_gets_a_failure_status(node, tmp_path, monkeypatch):
    """A 65-200 character Affected SOP Instance UID got no DIMSE answer (pynetdicom aborted)."""
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))  # so that our SCU sends it
    refused = node.metric("ctp_node_refused_instances_total", reason="invalid_uid")
    for length in (65, 200):
        uid = "1.2." + "3" * (length - 4)
        ds = ct_instance(tmp_path / "long.dcm", study=generate_uid(), series=generate_uid(), sop=uid)
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context("1.2.840.10008.1.1")
        # pynetdicom's requestor race (issue 23 item 0) would otherwise lose the C-ECHO's answer now and then.
        fix = [(evt.EVT_CONN_OPEN, lambda event: fix_reactor_race(event.assoc))]
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CTPNODE", evt_handlers=fix)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
            assert status.get("Status") == STATUS_CANNOT_UNDERSTAND, status
            assert "UID" in status.get("ErrorComment", "")
            assert assoc.send_c_echo().get("Status") == 0x0000  # the association goes on
        finally:
            assoc.release()
    assert node.metric("ctp_node_refused_instances_total", reason="invalid_uid") == refused + 2


def test_concurrent_oversized_instances_leave_memory_flat_and_no_partial_file(tmp_path):
    """Issue 23 item 3: 4 concurrent oversized C-STOREs each cost up to max_instance_bytes of memory until
    the cap cut them off (4 x 300 MB at the 64 MiB default: 96 -> 359 MB RSS, and it stayed there).
    Data sets now go to a file in the spool as they arrive, and an aborted one leaves no file behind."""
    cap = 32 << 20
    node = Node(tmp_path, max_instance_bytes=cap)
    try:
        study = generate_uid()
        huge = _large_instance(tmp_path / "huge.dcm", 4900, study, generate_uid())  # 48 MB, over the cap
        ok = _large_instance(tmp_path / "ok.dcm", 2000, study, generate_uid())  # 8 MB, under it
        assert _store_files(node, [ok]) == [0x0000]
        wait_steady(lambda: (node.threads(), node.fds()), 30, "the association to end")
        before = max(proc_status(node.proc.pid, "VmHWM"), proc_status(node.proc.pid, "VmRSS"))
        results: list[list[int | None]] = []
        senders = [threading.Thread(target=lambda: results.append(_store_files(node, [huge]))) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert results == [[None]] * 4  # each one A-ABORTed at the cap
        growth_mb = (proc_status(node.proc.pid, "VmHWM") - before) / 1024
        assert growth_mb < 48, f"peak RSS grew by {growth_mb:.0f} MB for 4 instances cut off at {cap >> 20} MiB"
        wait_for(lambda: node.metric("ctp_node_refused_instances_total", reason="too_large") == 4, 10, "the count")
        spool = node.settings.storage.spool_dir

        def files() -> list[Path]:
            return [p for p in spool.rglob("*") if p.is_file()]

        # Each association removes its partial file as it ends: only the accepted instance stays.
        wait_for(lambda: len(files()) == 1, 10, "the partial files removed")
        assert files()[0].parents[2] == spool and files()[0].suffix == ".dcm", files()
        assert _store_files(node, [ok]) == [0x0000]  # the node receives on as before
    finally:
        node.stop()
