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
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from ctp_node.node.scp import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES
from tests.node.dicom_helpers import ct_instance, require, run
from tests.node.running_node import RunningNode, proc_status, read_until_closed
from tests.peers import self_signed_certificate, wait_for

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
        time.sleep(0.3)
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
        with socket.create_connection(("127.0.0.1", node.port)):  # connects, never says hello
            time.sleep(0.2)
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
    from ctp_node.node.prometheus import MAX_CALLING_AE_LABELS, OTHER_CALLING_AE

    study, series = generate_uid(), generate_uid()
    before = sum(_received_by_calling_ae(node).values())
    titles = [f"PEER{i:03d}" for i in range(MAX_CALLING_AE_LABELS + 8)]
    for title in titles:
        assert _store_file(node, _instance(tmp_path, title, study, series), calling_ae=title) == (0x0000, "")
    wait_for(lambda: sum(_received_by_calling_ae(node).values()) == before + len(titles), 10, "the instances counted")
    labels = _received_by_calling_ae(node)
    assert len(labels) <= MAX_CALLING_AE_LABELS + 1 and labels[OTHER_CALLING_AE] >= 8
