import os

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ctp_node.config import AllowedCaller, DicomSettings
from ctp_node.node.receive.scp import start_scp
from ctp_node.node.shared.completeness import read_facts
from ctp_node.node.shared.dicom_status import STATUS_CANNOT_UNDERSTAND
from ctp_node.node.shared.spool import InvalidUIDError, SeriesKey, Spool, check_uid
from tests.node.dicom_helpers import ct_instance, require, run
from tests.ports import free_port


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0.1", "2.25.123456789012345678901234567890"])
def test_valid_uids(uid):
    assert check_uid(uid, "X") == uid


@pytest.mark.parametrize("uid", ["", None, "1..2", "1.02", "../etc", "1.2/3", "1.2.3a", "1." + "1" * 70, ".1"])
def test_invalid_uids_never_become_paths(uid):
    with pytest.raises(InvalidUIDError, match="not a valid DICOM UID"):
        check_uid(uid, "SeriesInstanceUID")


def test_spool_write_is_atomic_and_replaces(tmp_path):
    spool = Spool(tmp_path)
    key = SeriesKey("1.2.3", "1.2.3.4")
    path = spool.write(key, "1.2.3.4.5", b"first")
    assert path == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm" and path.read_bytes() == b"first"
    spool.write(key, "1.2.3.4.5", b"second")
    assert path.read_bytes() == b"second" and spool.instances(key) == [path]
    (path.parent / ".1.2.3.4.6.dcm.99.1.part").write_bytes(b"half")  # a crash mid-write
    assert spool.instances(key) == [path]
    assert spool.remove_partial_files() == 1
    (tmp_path / "not-a-uid").mkdir()
    assert list(spool.iter_series()) == [key]


@pytest.fixture()
def node(tmp_path):
    received = []
    settings = DicomSettings(ae_title="CTPNODE", bind_address="127.0.0.1", port=free_port())
    spool = Spool(tmp_path / "spool")
    server = start_scp(settings, spool, received.append)
    yield settings, spool, received
    server.shutdown()


def test_echo_and_called_ae_check(node):
    settings, _, _ = node
    echoscu = require("echoscu")
    assert run(echoscu, "-aec", "CTPNODE", "127.0.0.1", str(settings.port)).returncode == 0
    refused = run(echoscu, "-aec", "WRONGAE", "127.0.0.1", str(settings.port))
    assert refused.returncode != 0 and "called ae title not recogni" in (refused.stderr + refused.stdout).lower()


def test_storescu_uncompressed_and_jpeg_lossless(node, tmp_path):
    settings, spool, received = node
    storescu, dcmcjpeg = require("storescu"), require("dcmcjpeg")
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(3):
        files.append(tmp_path / f"plain{i}.dcm")
        ds = ct_instance(files[-1], study=study, series=series, value=10 * i)
        ds.ImagePositionPatient, ds.InstanceNumber = [0.0, 0.0, 5.0 * i], i + 1
        ds.save_as(files[-1], enforce_file_format=True)
    jpeg = tmp_path / "jpeg.dcm"
    assert run(dcmcjpeg, "+e1", str(files[0]), str(jpeg)).returncode == 0  # JPEG Lossless SV1
    original = pydicom.dcmread(files[0]).pixel_array
    os.remove(files[0])
    files[0] = jpeg
    result = run(
        storescu, "-xs", "-aet", "SCANNER", "-aec", "CTPNODE", "127.0.0.1", str(settings.port), *map(str, files)
    )
    assert result.returncode == 0, result.stderr
    key = SeriesKey(study, series)
    stored = spool.instances(key)
    assert len(stored) == 3 and len(received) == 3
    assert {r.calling_ae for r in received} == {"SCANNER"} and received[0].calling_host == "127.0.0.1"
    # the completeness facts come with the instance, read from the header the SCP parsed anyway
    assert all(r.facts is not None and r.facts == read_facts(r.path, r.sop_uid) for r in received)
    assert {r.facts.position for r in received} == {f"0.00\\0.00\\{5.0 * i:.2f}" for i in range(3)}
    back = {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in stored}
    assert "1.2.840.10008.1.2.4.70" in back  # stored as received, not re-encoded
    jpeg_back = next(p for p in stored if pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed)
    np.testing.assert_array_equal(pydicom.dcmread(jpeg_back).pixel_array, original)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uid_is_refused_with_a_reason(node, tmp_path):
    settings, spool, received = node
    ds = ct_instance(tmp_path / "bad.dcm", study="1.2.3", series="1.2.3.4")
    ds.SeriesInstanceUID = "1.2.3/../../escape"
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="CTPNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == STATUS_CANNOT_UNDERSTAND
    assert "SeriesInstanceUID" in status.ErrorComment
    assert not received and not any(spool.root.rglob("*.dcm"))
    assert not (tmp_path / "escape").exists()


def test_spool_moves_received_files_in_and_sweeps_partial_ones(tmp_path):
    spool = Spool(tmp_path)
    key = SeriesKey("1.2.3", "1.2.3.4")
    incoming = spool.incoming_dir
    incoming.mkdir()
    received = incoming / "x.part"
    received.write_bytes(b"received")
    inode = received.stat().st_ino
    path = spool.move_in(key, "1.2.3.4.5", received)
    assert path == spool.instance_path(key, "1.2.3.4.5") and path.read_bytes() == b"received"
    assert path.stat().st_ino == inode and not received.exists()  # renamed, not copied
    (incoming / "y.part").write_bytes(b"half an instance")  # a crash while receiving
    assert spool.remove_partial_files() == 1 and not any(incoming.iterdir())
    assert list(spool.iter_series()) == [key]  # .incoming is no study


def _c_store(settings: DicomSettings, *datasets) -> list:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="CTPNODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def test_received_instances_are_renamed_into_the_spool_and_refused_ones_leave_no_file(node, tmp_path):
    settings, spool, received = node
    study, series = generate_uid(), generate_uid()
    good = ct_instance(tmp_path / "good.dcm", study=study, series=series)
    bad = ct_instance(tmp_path / "bad.dcm", study=study, series=series)
    del bad.StudyInstanceUID  # refused once the header is read from the received file
    good_status, bad_status = _c_store(settings, good, bad)
    assert good_status.Status == 0x0000 and bad_status.Status == STATUS_CANNOT_UNDERSTAND
    [path] = spool.instances(SeriesKey(study, series))
    stored = pydicom.dcmread(path)
    assert stored.SOPInstanceUID == good.SOPInstanceUID and stored.PixelData == good.PixelData
    assert stored.file_meta.MediaStorageSOPInstanceUID == good.SOPInstanceUID
    assert [r.path for r in received] == [path]
    assert not any(spool.incoming_dir.iterdir())


def test_a_full_disk_while_receiving_is_answered_out_of_resources_and_leaves_no_file(node, tmp_path, monkeypatch):
    """ENOSPC part-way through a data set: 0xA700 (the sender retries later), the partial file removed at
    once, and the association goes on."""
    import errno

    from ctp_node.node.receive import scp
    from ctp_node.node.shared.dicom_status import STATUS_OUT_OF_RESOURCES

    settings, spool, received = node

    class FillingDisk:
        def __init__(self, fd: int) -> None:
            self.file, self.written = os.fdopen(fd, "wb"), 0

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 64 << 10:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def close(self) -> None:
            self.file.close()

    monkeypatch.setattr(scp, "_open_incoming", FillingDisk)
    study, series = generate_uid(), generate_uid()
    ds = ct_instance(tmp_path / "big.dcm", study=study, series=series)
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(2 * 512 * 512)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="CTPNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == STATUS_OUT_OF_RESOURCES and "No space left" in status.ErrorComment
        assert not received and not any(spool.incoming_dir.iterdir())
        monkeypatch.undo()  # space again
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert len(spool.instances(SeriesKey(study, series))) == 1 and not any(spool.incoming_dir.iterdir())


@pytest.mark.parametrize("version", ["3.1.0", "2.1.1", "4.0.0.dev0", "unknown"])
def test_the_receiver_refuses_to_start_on_a_pynetdicom_it_was_not_vetted_on(tmp_path, monkeypatch, version):
    import pynetdicom

    from ctp_node.node.receive.scp import check_pynetdicom

    check_pynetdicom()  # the installed one
    monkeypatch.setattr(pynetdicom, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"pynetdicom {version} is installed.*pynetdicom 3\.0\.x only"):
        start_scp(DicomSettings(bind_address="127.0.0.1", port=free_port()), Spool(tmp_path), lambda i: None)


def test_allow_list_checks_ae_title_and_host(tmp_path):
    echoscu = require("echoscu")
    settings = DicomSettings(
        ae_title="CTPNODE",
        bind_address="127.0.0.1",
        port=free_port(),
        allowed_callers=(AllowedCaller(ae_title="SCANNER"), AllowedCaller(ae_title="PACS", host="10.9.9.9")),
    )
    server = start_scp(settings, Spool(tmp_path), lambda r: None)
    try:
        args = ["-aec", "CTPNODE", "127.0.0.1", str(settings.port)]
        assert run(echoscu, "-aet", "SCANNER", *args).returncode == 0
        assert run(echoscu, "-aet", "INTRUDER", *args).returncode != 0
        assert run(echoscu, "-aet", "PACS", *args).returncode != 0  # right title, wrong host
    finally:
        server.shutdown()


def _fake_assoc():
    """Just enough of an Association for an AssociationSocket to wrap a socket."""
    import queue
    from types import SimpleNamespace

    return SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()), network_timeout=5, _server=None)


def test_bulk_read_socket_returns_what_pynetdicom_would():
    import socket
    import threading

    from pynetdicom.transport import AssociationSocket

    from ctp_node.node.shared.dicom_transport import BulkReadSocket

    payload = bytes(range(256)) * 2048  # 512 KB, sent in uneven pieces
    for cls in (AssociationSocket, BulkReadSocket):
        ours, theirs = socket.socketpair()
        wrapped = cls(_fake_assoc(), client_socket=ours)

        def send(sock=theirs):
            for start in range(0, len(payload), 70_001):
                sock.sendall(payload[start : start + 70_001])
            sock.close()  # then the peer goes away mid-PDU

        sender = threading.Thread(target=send)
        sender.start()
        first = wrapped.recv(131_078)
        rest = wrapped.recv(len(payload))  # more than will ever arrive: a short read at close
        sender.join()
        ours.close()
        assert bytes(first) == payload[:131_078], cls.__name__
        assert bytes(rest) == payload[131_078:], cls.__name__
        assert isinstance(rest, bytearray)


def test_connections_get_nodelay_bulk_reads_timeouts_and_the_configured_poll_interval():
    import socket
    from types import SimpleNamespace

    from pynetdicom.transport import AssociationSocket

    from ctp_node.config import DicomSettings
    from ctp_node.node.receive.scp import tune_connection
    from ctp_node.node.shared.dicom_transport import BulkReadSocket

    def event(dul):
        acceptor = SimpleNamespace(maximum_length=131072)
        return SimpleNamespace(assoc=SimpleNamespace(dul=dul, is_acceptor=True, acceptor=acceptor))

    ours, theirs = socket.socket(), None
    try:
        wrapped = AssociationSocket(_fake_assoc(), client_socket=ours)
        dul = SimpleNamespace(socket=wrapped, _run_loop_delay=0.001)
        tune_connection(event(dul), DicomSettings(poll_interval_ms=0.5, network_timeout_s=7))
        assert isinstance(dul.socket, BulkReadSocket) and dul._run_loop_delay == 0.0005
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert ours.gettimeout() == 7 and dul.socket.read_timeout_s == 7
        assert dul.socket.max_receive == 131072
        assert dul.socket._quickack == hasattr(socket, "TCP_QUICKACK")
        closed = SimpleNamespace(socket=None, _run_loop_delay=0.001)
        tune_connection(event(closed), DicomSettings())
        assert closed._run_loop_delay == 0.001  # nothing to tune on a connection already gone
    finally:
        ours.close()
        del theirs


@pytest.mark.parametrize(
    ("pdu_type", "length", "allowed"),
    [
        (0x04, 131072 + 6, True),
        (0x04, 131072 + 7, False),
        (0x04, 2**32 - 1, False),
        (0x01, 1 << 20, True),
        (0x01, (1 << 20) + 1, False),
        (0x07, 4, True),
        (0x07, 1 << 20, False),
    ],
)
def test_claimed_pdu_lengths_are_capped_before_allocation(pdu_type, length, allowed):
    import socket
    import threading

    from ctp_node.node.shared.dicom_transport import BulkReadSocket

    ours, theirs = socket.socketpair()
    wrapped = BulkReadSocket(_fake_assoc(), client_socket=ours)
    wrapped.read_timeout_s, wrapped.max_receive = 5.0, 131072
    body = b"x" * min(length, 2_000_000) if allowed else b""
    sender = threading.Thread(target=lambda: theirs.sendall(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body))
    sender.start()
    try:
        header = wrapped.recv(6)
        if allowed:
            assert len(header) == 6 and len(wrapped.recv(length)) == length
        else:
            assert header == bytearray()  # pynetdicom's "connection closed": no body is read
            abort = theirs.recv(64)
            assert abort[:1] == b"\x07" and abort[-2:] == b"\x02\x06"  # A-ABORT, provider, invalid value
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_pdu_must_arrive_within_the_read_timeout():
    import socket
    import time

    from ctp_node.node.shared.dicom_transport import BulkReadSocket

    ours, theirs = socket.socketpair()
    wrapped = BulkReadSocket(_fake_assoc(), client_socket=ours)
    wrapped.read_timeout_s = 0.5
    theirs.sendall(b"\x04\x00\x00\x00\x00\x10" + b"abc")  # a P-DATA-TF header, then 3 of 16 bytes
    try:
        start = time.monotonic()
        assert len(wrapped.recv(6)) == 6
        assert len(wrapped.recv(16)) == 3  # short: pynetdicom treats it as a closed connection
        assert time.monotonic() - start < 5
        assert theirs.recv(16) == b""  # and the node closed its side
    finally:
        ours.close()
        theirs.close()


def test_the_scu_caps_claims_and_times_out_on_a_hostile_scp():
    """The node's sender gets the same socket: a peer answering with a 4 GB claim, or with half a
    PDU and then silence, ends the association instead of holding the worker."""
    import socket
    import threading

    from ctp_node.node.shared.peer import Peer
    from ctp_node.node.work.scu import echo

    for answer in (b"\x02\x00\xff\xff\xff\xff", b"\x02\x00\x00\x00\x01\x00" + b"\x00" * 10):
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        seen: list[bytes] = []

        def serve(server=server, answer=answer, seen=seen):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)  # the A-ASSOCIATE-RQ
                conn.sendall(answer)
                conn.settimeout(10)
                try:
                    while data := conn.recv(65536):
                        seen.append(data)
                except OSError:
                    pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            ok, message = echo(Peer("127.0.0.1", port, "HOSTILE"), "CTPNODE", timeout_s=1.0)
        finally:
            thread.join(timeout=15)
            server.close()
        assert not ok and not thread.is_alive()
        if answer.startswith(b"\x02\x00\xff"):
            assert b"".join(seen)[:1] == b"\x07"  # A-ABORT for the over-long claim
