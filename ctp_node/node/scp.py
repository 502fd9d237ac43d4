"""The receiving side: a pynetdicom SCP answering C-ECHO and C-STORE of CT and Enhanced CT images.

The C-STORE handler only writes the instance durably to the spool (without decoding its pixel data)
and reports it to ``on_stored``; it never waits on processing. The checks and the write are
``ctp_node.node.ingest.accept_instance``, shared with STOW-RS (``ctp_node.web.stow``). Refusals are
explicit DICOM statuses with an ErrorComment, each counted in ``ctp_node_refused_instances{reason}``:
0xA700 (out of resources: the disk, the job store), 0xC000 (cannot understand: missing, invalid or
inconsistent UIDs, an unreadable header). Associations are refused for a wrong called AE title and, with an
allow-list, for a calling AE title / host pair not on it.

Hostile or broken peers (the socket layer, before any authentication): a PDU may claim at most what
its type can hold (P-DATA-TF: our maximum PDU size plus its header; association PDUs 1 MiB), checked
on the 6-byte header before anything is allocated; every PDU must arrive whole within
``network_timeout_s`` and every send complete within it; TLS handshakes run in the connection's own
thread with ``acse_timeout_s`` as their limit, never in the accept loop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from ctp_node.config import DicomSettings
from ctp_node.node.completeness import LAST_TAG_READ
from ctp_node.node.dicom_status import (  # noqa: F401  (the refusal statuses are re-exported)
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from ctp_node.node.ingest import (  # noqa: F401  (ReceivedInstance, Refusal, ... re-exported for callers of scp)
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    Claim,
    OnRefused,
    OnStored,
    Origin,
    ReceivedInstance,
    Refusal,
    accept_instance,
)
from ctp_node.node.spool import Spool

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from ctp_node.node.prometheus import NodeMetrics

log = logging.getLogger(__name__)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _series_header(event: evt.Event) -> Dataset:
    """The elements up to NumberOfFrames (identity, series, slice position, volume number: what the
    spool and the completeness check need), read from the raw stream without copying the pixel data
    (decoding the whole dataset costs about 1 ms per 512 x 512 instance)."""
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        return event.dataset
    stream = event.request.DataSet
    stream.seek(0)
    try:
        return read_dataset(
            stream, syntax.is_implicit_VR, syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag > LAST_TAG_READ,
        )  # fmt: skip
    finally:
        stream.seek(0)


def handle_store(
    event: evt.Event, spool: Spool, on_stored: OnStored, on_refused: OnRefused | None = None
) -> int | Dataset:
    """Write one instance to the spool (``ingest.accept_instance``); Success only once it is on disk."""
    origin = Origin(event.assoc.requestor.ae_title, event.assoc.requestor.address)
    try:
        accept_instance(
            lambda: _series_header(event),
            Claim.from_command(event.request),
            lambda: event.encoded_dataset(include_meta=True),
            origin,
            spool,
            on_stored,
            on_refused,
        )
    except Refusal as refusal:
        return _failure(refusal.status, refusal.comment)
    return STATUS_SUCCESS


def handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS


def handle_requested(event: evt.Event, dicom: DicomSettings) -> None:
    """Refuse an association whose calling AE title and host are not on the allow-list."""
    if not dicom.allowed_callers:
        return
    calling = event.assoc.requestor.primitive.calling_ae_title.strip()
    host = event.assoc.requestor.address
    for allowed in dicom.allowed_callers:
        if allowed.ae_title == calling and (allowed.host is None or allowed.host == host):
            return
    log.warning("rejected association from %s@%s: not on the allow-list", calling, host)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised


# The most a PDU of each type may claim, whatever our maximum PDU size (PS3.8 9.3). Association
# PDUs hold presentation contexts and user identity: a few KB in practice, 1 MiB is generous.
# A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long by definition.
MAX_ASSOCIATE_PDU = 1 << 20
MAX_SHORT_PDU = 64
PDATA_HEADER = 6  # some peers fill the PDV to the negotiated maximum, so its item header comes on top
# When a peer is told "no limit" (maximum length 0), what a P-DATA-TF may still claim.
MAX_UNLIMITED_PDATA = 64 << 20
# Source 2 (service provider), reason 6 (invalid PDU parameter value) or 1 (unrecognized PDU).
_A_ABORT_INVALID_LENGTH = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_A_ABORT_UNRECOGNIZED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def pdu_limit(pdu_type: int, max_receive: int) -> int | None:
    """The longest length a PDU of this type may claim; None for types pynetdicom refuses anyway."""
    if pdu_type == 0x04:
        return (max_receive or MAX_UNLIMITED_PDATA) + PDATA_HEADER
    if pdu_type in (0x01, 0x02):
        return MAX_ASSOCIATE_PDU
    if pdu_type in (0x03, 0x05, 0x06, 0x07):
        return MAX_SHORT_PDU
    return None


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, hardened and faster; pynetdicom's reader calls ``recv(6)`` for each PDU
    header, then ``recv(length)`` for its body.

    - Each header's claimed length is checked against :func:`pdu_limit` before anything is
      allocated: an over-long claim is answered with an A-ABORT, logged, and the connection closed
      (pynetdicom would allocate whatever 4 bytes claim, up to 4 GB, before any authentication).
      So is a PDU type that does not exist: pynetdicom logged an error and read on, taking the next
      6 bytes as another header (64 KiB of random bytes: 77 ERROR lines).
    - A whole PDU (header and body) must arrive within ``read_timeout_s`` and each send must
      complete within it, else the connection is closed: accepted sockets have no timeout of their
      own, so a peer that sent half a header held its thread and association slot for ever.
    - Each PDU is read into one buffer sized to it, with as few ``recv`` calls as the kernel allows:
      pynetdicom asks for 4 KB per call, 128 Python-level calls and copies for every 512 x 512
      instance; this returns the same bytes (a short buffer when the peer closes) for a quarter
      less CPU per instance (benchmarks/ingest.py).
    - On Linux, a quick ACK is re-armed after each read: a peer with Nagle's algorithm on (DCMTK's
      default) holds the tail of each PDU until the previous segment is acknowledged, and a
      delayed ACK makes that 40 ms per PDU (benchmarks/turnaround.py).
    """

    read_timeout_s: float | None = None
    max_receive: int = 0
    _body_expected: bool = False
    _deadline: float | None = None
    _quickack: bool = False

    @classmethod
    def adopt(cls, wrapped: AssociationSocket, read_timeout_s: float | None, max_receive: int) -> BulkReadSocket:
        """Turn pynetdicom's socket (already connected or accepted) into this class, in place."""
        wrapped.__class__ = cls
        assert isinstance(wrapped, BulkReadSocket)
        wrapped.read_timeout_s, wrapped.max_receive = read_timeout_s, max_receive
        wrapped._body_expected, wrapped._deadline = False, None
        if wrapped.socket is not None:
            wrapped.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wrapped.socket.settimeout(read_timeout_s)
            wrapped._quickack = _QUICKACK is not None and wrapped.socket.family in (socket.AF_INET, socket.AF_INET6)
        return wrapped

    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address if self.assoc.is_acceptor else self.assoc.acceptor.address)
        except Exception:  # only for the log line
            return "peer"

    def _drop(self, reason: str, abort: bool, message: bytes = _A_ABORT_INVALID_LENGTH) -> None:
        """Log, optionally A-ABORT (``message``), and shut the connection; the short read that follows is
        pynetdicom's "connection closed" (Evt17), which ends the association."""
        log.warning("closing connection from %s: %s", self._peer(), reason)
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):  # the peer may be gone already
            if abort:
                sock.settimeout(1.0)
                sock.sendall(message)
            sock.shutdown(socket.SHUT_RDWR)

    def _read(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        sock = self.socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                if self._deadline is not None:
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not count:  # connection closed: what arrived, as pynetdicom returns it
                    return buffer[:nr_read]
                nr_read += count
                if self._quickack:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except TimeoutError:
            self._drop(f"PDU not received in full within {self.read_timeout_s} s", abort=False)
            return buffer[:nr_read]
        return buffer

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body_expected:
            self._body_expected = False
            limit = max(MAX_ASSOCIATE_PDU, pdu_limit(0x04, self.max_receive) or 0)
            if nr_bytes > limit:  # cannot happen after the header check; never allocate it anyway
                self._drop(f"PDU body of {nr_bytes} bytes", abort=True)
                return bytearray()
            return self._read(nr_bytes)
        # A PDU header: the clock for the whole PDU starts now.
        self._deadline = None if self.read_timeout_s is None else time.monotonic() + self.read_timeout_s
        header = self._read(nr_bytes)
        if nr_bytes != 6 or len(header) != 6:
            return header
        pdu_type, claimed = header[0], int.from_bytes(header[2:6], "big")
        limit = pdu_limit(pdu_type, self.max_receive)
        if limit is None:  # no such PDU type: one warning and the connection closed
            self._drop(f"unknown PDU type 0x{pdu_type:02X}", abort=True, message=_A_ABORT_UNRECOGNIZED)
            return bytearray()
        if claimed > limit:
            self._drop(f"PDU type 0x{pdu_type:02X} claims {claimed} bytes, more than {limit}", abort=True)
            return bytearray()
        self._body_expected = True
        return header

    def send(self, bytestream: bytes) -> None:
        if self.socket is not None:
            with contextlib.suppress(OSError):  # already closed: pynetdicom's send reports it
                self.socket.settimeout(self.read_timeout_s)  # a peer that stops reading must not hold us
        super().send(bytestream)


def tune_socket(assoc: Association, read_timeout_s: float | None, poll_interval_s: float | None = None) -> None:
    """Per-connection transport settings for either side, applied as the connection opens."""
    dul = assoc.dul
    if dul.socket is None or dul.socket.socket is None:
        return
    own = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    BulkReadSocket.adopt(dul.socket, read_timeout_s, own.maximum_length or 0)
    if poll_interval_s is not None:
        # pynetdicom's reactor sleeps this long whenever it finds nothing to do (1 ms by default),
        # which is on the path of every PDU and every response.
        dul._run_loop_delay = poll_interval_s


def tune_connection(event: evt.Event, dicom: DicomSettings) -> None:
    """The SCP's settings for an accepted connection (EVT_CONN_OPEN)."""
    # Nagle's algorithm and delayed ACKs cost 40 ms per PDU exchange (43 s instead of 0.9 s for a
    # 960-instance study): BulkReadSocket.adopt sets TCP_NODELAY, and its reads re-arm quick ACKs.
    tune_socket(event.assoc, dicom.network_timeout_s, dicom.poll_interval_ms / 1000.0)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket in ``get_request``, i.e. in the one thread that accepts
    connections: one peer that connects and says nothing stalls every TLS association. Here the
    accept loop only accepts; the handshake runs in the connection's own thread, limited to
    ``handshake_timeout_s``, and a failed one is logged and closed.
    """

    handshake_timeout_s: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # type: ignore[return-value]

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        context = self.ssl_context
        if context is not None:
            try:
                request.settimeout(self.handshake_timeout_s)
                request = context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def ssl_context(dicom: DicomSettings) -> ssl.SSLContext | None:
    if dicom.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(dicom.tls.certificate), keyfile=str(dicom.tls.private_key))
    if dicom.tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(dicom.tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if dicom.tls.require_client_certificate else ssl.CERT_NONE
    return context


def build_ae(dicom: DicomSettings) -> AE:
    ae = AE(ae_title=dicom.ae_title)
    ae.require_called_aet = True
    ae.maximum_pdu_size = dicom.max_pdu_bytes
    ae.maximum_associations = dicom.max_associations
    ae.acse_timeout = dicom.acse_timeout_s
    ae.dimse_timeout = dicom.dimse_timeout_s
    ae.network_timeout = dicom.network_timeout_s
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def start_scp(
    dicom: DicomSettings, spool: Spool, on_stored: OnStored, metrics: NodeMetrics | None = None
) -> ThreadedAssociationServer:
    """Start listening in background threads; ``server.shutdown()`` stops it."""
    ae = build_ae(dicom)
    on_refused = None if metrics is None else (lambda reason: metrics.refused.labels(reason).inc())
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, on_stored, on_refused]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, handle_requested, [dicom]),
        (evt.EVT_CONN_OPEN, tune_connection, [dicom]),
    ]
    server = ae.make_server(
        (dicom.bind_address, dicom.port),
        evt_handlers=handlers,
        ssl_context=ssl_context(dicom),
        server_class=NodeServer,
    )
    server.handshake_timeout_s = dicom.acse_timeout_s
    # As AE.start_server(block=False) does, with our server class.
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer:{dicom.port}", daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info("listening as %s on %s:%d", dicom.ae_title, dicom.bind_address, dicom.port)
    return server
