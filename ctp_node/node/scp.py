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
``network_timeout_s`` and every send complete within it. Until its A-ASSOCIATE-RQ is whole (TLS
handshake included, within ``acse_timeout_s``) a connection waits in :class:`HandshakeGate`, one
thread for all, holding no association slot; pending connections are capped in all and per host,
the oldest closed to make room. A C-STORE data set over ``max_instance_bytes`` ends the association
(A-ABORT) as it arrives; a C-STORE whose command UIDs are invalid is answered 0xC000 (:class:`NodeDIMSE`).

Memory per association is bounded by a PDU, not by an instance: a C-STORE data set goes to a file in the
spool's ``.incoming`` folder fragment by fragment as it arrives (:class:`IncomingDataset`), the handler
reads the header from that file and, once the instance is accepted, renames it into place (same
filesystem: no copy). A refused instance's file is removed by the handler, an association that ends
mid-instance (dropped, aborted, over the size cap) removes its partial files as its thread ends, and
the receiver sweeps ``.incoming`` before it listens (a crash). pynetdicom's own
``STORE_RECV_CHUNKED_DATASET`` does the same into the system temp folder (a copy, not a rename, to
reach the spool) and leaves the file behind when an association drops mid-instance, hence our own.

:class:`NodeDIMSE`, :class:`NodeRequestHandler`, :class:`BulkReadSocket` and :class:`IncomingDataset` use
pynetdicom internals read in 3.0.0 to 3.0.4 (``_VETTED_PYNETDICOM``); :func:`check_pynetdicom` stops the
node with a clear error on any other version rather than receive without these limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import validate_uid

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
from ctp_node.node.spool import TMP_SUFFIX, Spool
from ctp_node.permissions import FILE_MODE, make_dirs

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import P_DATA

    from ctp_node.node.prometheus import NodeMetrics

log = logging.getLogger(__name__)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


# Header elements longer than this are not read (pydicom defers them, and they are then dropped): no
# identity or geometry element comes near it, and a hostile one must not be held in memory.
HEADER_ELEMENT_LIMIT = 64 << 10
# Of a deflated data set, at most this much is inflated to find the header (a "zip bomb" of 64 MiB
# could inflate to gigabytes).
DEFLATED_HEADER_LIMIT = 4 << 20


def _stop_after_header(tag: int, vr: str | None, length: int) -> bool:
    return tag > LAST_TAG_READ


def _without_deferred(header: Dataset) -> Dataset:
    """``header`` without the elements pydicom deferred (over ``HEADER_ELEMENT_LIMIT``): read later they
    would need the file, which is renamed or removed by then; a missing UID is refused as such."""
    for tag in list(header.keys()):
        raw = header.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            del header[tag]
    return header


def _read_header(fh: BinaryIO, syntax: UID) -> Dataset:
    """The elements up to NumberOfFrames (identity, series, slice position, volume number: what the
    spool and the completeness check need) of the data set starting at ``fh``'s position, without
    reading the pixel data (decoding the whole dataset costs about 1 ms per 512 x 512 instance)."""
    stream: BinaryIO = fh
    if syntax.is_deflated:
        inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), bytearray()
        while len(inflated) < DEFLATED_HEADER_LIMIT and (chunk := inflater.unconsumed_tail or fh.read(1 << 16)):
            inflated += inflater.decompress(chunk, DEFLATED_HEADER_LIMIT - len(inflated))
        stream = BytesIO(inflated)
    header = read_dataset(
        stream,
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        stop_when=_stop_after_header,
        defer_size=HEADER_ELEMENT_LIMIT,
    )
    return _without_deferred(header)


def _series_header(event: evt.Event, incoming: IncomingDataset | None) -> Dataset:
    """The header of the C-STORE's data set: from the file it was received into, else (a data set
    pynetdicom kept in memory or wrote itself) from pynetdicom's stream or file."""
    syntax = event.context.transfer_syntax
    if incoming is not None:
        if incoming.error is not None:  # could not be written (disk full): the sender should retry
            raise Refusal(
                STATUS_OUT_OF_RESOURCES, "disk", f"node cannot store: {incoming.error.strerror or incoming.error}"
            )
        assert incoming.path is not None
        with open(incoming.path, "rb") as fh:
            fh.seek(incoming.offset)
            return _read_header(fh, syntax)
    path = getattr(event.request, "_dataset_path", None)
    if isinstance(path, Path):  # pynetdicom's STORE_RECV_CHUNKED_DATASET (set by someone else)
        return _without_deferred(dcmread(path, stop_before_pixels=True, defer_size=HEADER_ELEMENT_LIMIT))
    stream = event.request.DataSet
    stream.seek(0)
    try:
        return _read_header(stream, syntax)
    finally:
        stream.seek(0)


def handle_store(
    event: evt.Event, spool: Spool, on_stored: OnStored, on_refused: OnRefused | None = None
) -> int | Dataset:
    """Put one instance in the spool (``ingest.accept_instance``); Success only once it is on disk.

    The data set normally arrives as a file under the spool's ``.incoming`` folder (:class:`NodeDIMSE`):
    it is renamed into place if accepted and removed otherwise, so nothing of it outlives this call."""
    origin = Origin(event.assoc.requestor.ae_title, event.assoc.requestor.address)
    incoming = getattr(event.request, "_dataset_file", None)
    if not isinstance(incoming, IncomingDataset):
        incoming = None
    if incoming is not None:
        received = incoming.path  # None only with incoming.error, refused before it is asked for
        try:
            accept_instance(
                lambda: _series_header(event, incoming),
                Claim.from_command(event.request),
                lambda: cast(Path, received),
                origin,
                spool,
                on_stored,
                on_refused,
            )
        except Refusal as refusal:
            return _failure(refusal.status, refusal.comment)
        finally:
            incoming.discard()  # moved into place, or refused: either way not left in .incoming
        return STATUS_SUCCESS
    return _handle_store_in_memory(event, origin, spool, on_stored, on_refused)


def _handle_store_in_memory(
    event: evt.Event, origin: Origin, spool: Spool, on_stored: OnStored, on_refused: OnRefused | None
) -> int | Dataset:
    """A data set pynetdicom kept itself: received without an ``incoming_dir``, one whose file meta could
    not be made (no file was written), or one received while pynetdicom's own
    ``STORE_RECV_CHUNKED_DATASET`` is set (a file in the system temp folder)."""
    views: list[memoryview] = []
    path = getattr(event.request, "_dataset_path", None)

    def encoded() -> list[bytes | memoryview] | Path:
        if isinstance(path, Path):
            return path
        # What event.encoded_dataset(include_meta=True) returns, without the two copies it makes of the
        # data set (getvalue(), then a join): an instance costs its size in memory once, not three times.
        stream = event.request.DataSet
        if not isinstance(stream, BytesIO):
            return [event.encoded_dataset(include_meta=True)]
        views.append(stream.getbuffer())
        return [b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta), views[-1]]

    try:
        accept_instance(
            lambda: _series_header(event, None),
            Claim.from_command(event.request),
            encoded,
            origin,
            spool,
            on_stored,
            on_refused,
        )
    except Refusal as refusal:
        return _failure(refusal.status, refusal.comment)
    finally:
        for view in views:  # an exported buffer would keep pynetdicom from resizing or closing the stream
            view.release()
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
# Source 2, reason 2: unexpected PDU (anything but an A-ASSOCIATE-RQ first). Source 0: the service user.
_A_ABORT_UNEXPECTED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2])
_A_ABORT_BY_USER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded (as pynetdicom sends).
_ASSOCIATE_RJ_BUSY = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02])
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
    max_dataset_bytes: int | None = None  # the SCP's max_instance_bytes; None: not counted (the SCU)
    on_oversize: Callable[[], None] | None = None
    _body_expected: bool = False
    _body_type: int = 0
    _deadline: float | None = None
    _quickack: bool = False
    _prefetched: bytearray | None = None
    _dataset_bytes: int = 0
    _closing: bool = False

    @classmethod
    def adopt(
        cls,
        wrapped: AssociationSocket,
        read_timeout_s: float | None,
        max_receive: int,
        prefetched: bytes = b"",
        max_dataset_bytes: int | None = None,
        on_oversize: Callable[[], None] | None = None,
    ) -> BulkReadSocket:
        """Turn pynetdicom's socket (already connected or accepted) into this class, in place.
        ``prefetched``: what :class:`HandshakeGate` already read off the connection (the A-ASSOCIATE-RQ),
        returned by the first reads before anything more is read from the socket."""
        wrapped.__class__ = cls
        assert isinstance(wrapped, BulkReadSocket)
        wrapped.read_timeout_s, wrapped.max_receive = read_timeout_s, max_receive
        wrapped._body_expected, wrapped._deadline = False, None
        wrapped._prefetched = bytearray(prefetched) if prefetched else None
        wrapped.max_dataset_bytes, wrapped.on_oversize = max_dataset_bytes, on_oversize
        wrapped._dataset_bytes, wrapped._closing = 0, False
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

    @property
    def ready(self) -> bool:
        if self._prefetched:  # bytes already read off the socket: select() would not report them
            return True
        return super().ready

    def _read(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        sock = self.socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        if self._prefetched:
            nr_read = min(nr_bytes, len(self._prefetched))
            view[:nr_read] = self._prefetched[:nr_read]
            del self._prefetched[:nr_read]
            if nr_read == nr_bytes:
                return buffer
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

    def _count_dataset(self, body: bytearray) -> bool:
        """Add a P-DATA-TF body's data set fragments to the message's count; False once the count
        passes ``max_dataset_bytes``, with the body's "last fragment" bits cleared, so that pynetdicom
        never completes (and hands on) the oversized message before the connection is gone."""
        assert self.max_dataset_bytes is not None
        offset, end, over = 0, len(body), False
        while offset + 6 <= end:  # PDV items: 4-byte length, context ID, message control header, data
            length = int.from_bytes(body[offset : offset + 4], "big")
            if length < 2:
                break  # malformed: pynetdicom's decoder refuses it
            control = body[offset + 5]
            if not control & 0x01:  # a data set fragment (commands are a few hundred bytes)
                self._dataset_bytes += length - 2
                if self._dataset_bytes > self.max_dataset_bytes:
                    over = True
                if control & 0x02:
                    if over:
                        body[offset + 5] = control & ~0x02
                    else:
                        self._dataset_bytes = 0  # the message is whole: the next one starts at 0
            offset += 4 + length
        return not over

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body_expected:
            self._body_expected = False
            limit = max(MAX_ASSOCIATE_PDU, pdu_limit(0x04, self.max_receive) or 0)
            if nr_bytes > limit:  # cannot happen after the header check; never allocate it anyway
                self._drop(f"PDU body of {nr_bytes} bytes", abort=True)
                return bytearray()
            body = self._read(nr_bytes)
            if self._body_type == 0x04 and self.max_dataset_bytes is not None and not self._count_dataset(body):
                # The instance is larger than any the node accepts: A-ABORT now rather than hold it
                # in memory to the end. The next header read returns nothing (Evt17, quietly).
                self._drop(
                    f"an instance larger than {self.max_dataset_bytes} bytes (dicom.max_instance_bytes)",
                    abort=True,
                    message=_A_ABORT_BY_USER,
                )
                self._closing = True
                if self.on_oversize is not None:
                    self.on_oversize()
            return body
        if self._closing:
            return bytearray()
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
        self._body_expected, self._body_type = True, pdu_type
        return header

    def send(self, bytestream: bytes) -> None:
        if self.socket is not None:
            with contextlib.suppress(OSError):  # already closed: pynetdicom's send reports it
                self.socket.settimeout(self.read_timeout_s)  # a peer that stops reading must not hold us
        super().send(bytestream)


def tune_socket(
    assoc: Association,
    read_timeout_s: float | None,
    poll_interval_s: float | None = None,
    *,
    prefetched: bytes = b"",
    max_dataset_bytes: int | None = None,
    on_oversize: Callable[[], None] | None = None,
) -> None:
    """Per-connection transport settings for either side, applied as the connection opens."""
    dul = assoc.dul
    if dul.socket is None or dul.socket.socket is None:
        return
    own = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    BulkReadSocket.adopt(
        dul.socket, read_timeout_s, own.maximum_length or 0, prefetched, max_dataset_bytes, on_oversize
    )
    if poll_interval_s is not None:
        # pynetdicom's reactor sleeps this long whenever it finds nothing to do (1 ms by default),
        # which is on the path of every PDU and every response.
        dul._run_loop_delay = poll_interval_s


def tune_connection(event: evt.Event, dicom: DicomSettings) -> None:
    """The SCP's settings for an accepted connection (what :class:`NodeRequestHandler` applies)."""
    # Nagle's algorithm and delayed ACKs cost 40 ms per PDU exchange (43 s instead of 0.9 s for a
    # 960-instance study): BulkReadSocket.adopt sets TCP_NODELAY, and its reads re-arm quick ACKs.
    tune_socket(event.assoc, dicom.network_timeout_s, dicom.poll_interval_ms / 1000.0)


def _open_incoming(fd: int) -> BinaryIO:
    """The file object an incoming data set is written through (a seam: tests fill the disk here)."""
    return os.fdopen(fd, "wb")


class IncomingDataset:
    """The data set of one incoming DIMSE message, written where it belongs as pynetdicom decodes it.

    Set as the message's ``data_set`` by :class:`NodeDIMSE` in place of pynetdicom's ``BytesIO``:
    pynetdicom's decoder calls :meth:`write` with each data set fragment (at most a PDU), after the
    command set is decoded. A C-STORE request's data set goes to a new file under ``folder`` (the
    spool's ``.incoming``), after the preamble and the file meta information the spool file needs (the
    same bytes ``event.file_meta`` gives), so that the accepted file is renamed into the spool as it is.
    Any other message's data set (small; only C-STORE carries instances) stays in memory as before.

    A write that fails (a full disk) is logged once; the file is removed at once (freeing the space) and
    the rest of the data set is dropped, so the association goes on and the handler answers 0xA700 (out
    of resources): the sender retries later. :meth:`finish` hands the message back to pynetdicom when
    it is whole; :meth:`discard` removes the file unless it was moved into the spool meanwhile.
    """

    def __init__(
        self,
        message: DIMSEMessage,
        assoc: Association,
        folder: Path,
        on_discarded: Callable[[IncomingDataset], None] | None = None,
    ) -> None:
        self._message, self._assoc, self._folder, self._on_discarded = message, assoc, folder, on_discarded
        self.path: Path | None = None  # the file, once the first fragment of a C-STORE data set arrived
        self.offset = 0  # where the data set starts in the file
        self.error: OSError | None = None
        self._file: BinaryIO | None = None
        self._memory: BytesIO | None = None
        self._started = False
        self._lock = threading.Lock()  # a write (the DUL thread) against a discard (the association's end)

    @property
    def name(self) -> str:
        """The file's name, as pynetdicom's temporary file has (it unlinks it after the C-STORE handler)."""
        return str(self.path or "")

    def write(self, data: bytes) -> int:
        with self._lock:
            if not self._started:
                self._start()
            if self._file is not None:
                try:
                    self._file.write(data)
                except OSError as exc:
                    self._fail(exc)
            elif self._memory is not None:
                self._memory.write(data)
        return len(data)

    def _start(self) -> None:
        self._started = True
        message = self._message
        if not isinstance(message, C_STORE_RQ):
            self._memory = BytesIO()
            return
        try:
            command = message.command_set
            meta = encode_file_meta(
                create_file_meta(
                    sop_class_uid=UID(str(command.AffectedSOPClassUID)),
                    sop_instance_uid=UID(str(command.AffectedSOPInstanceUID)),
                    transfer_syntax=self._assoc._accepted_cx[cast(int, message.context_id)].transfer_syntax[0],
                )
            )
        except Exception:  # no such context, UIDs pydicom cannot encode: refused anyway (NodeDIMSE, pynetdicom)
            self._memory = BytesIO()
            return
        try:
            try:
                fd, name = tempfile.mkstemp(dir=self._folder, suffix=TMP_SUFFIX)
            except FileNotFoundError:  # the first instance this spool receives (or the folder was removed)
                make_dirs(self._folder)
                fd, name = tempfile.mkstemp(dir=self._folder, suffix=TMP_SUFFIX)
        except OSError as exc:
            return self._fail(exc)
        self.path = Path(name)
        try:
            self._file = _open_incoming(fd)
            os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; the spool's files are 0640
            self._file.write(b"\x00" * 128 + b"DICM" + meta)
            self.offset = 132 + len(meta)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            log.error("could not receive an instance from %s: %s", _requestor(self._assoc), exc)
        self.error = exc
        self._close()
        self._unlink()

    def _close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # flushes: may meet a full disk too
            except OSError as exc:
                self._fail(exc)

    def _unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    def finish(self) -> None:
        """The message is whole: the file closed (not yet fsync'd: :meth:`Spool.move_in` does that) and the
        message given what pynetdicom expects, the data set's path and this object as its "file"."""
        with self._lock:
            if not self._started and isinstance(self._message, C_STORE_RQ):
                self._start()  # an empty data set: a file with the file meta alone (refused as such)
            self._close()
            message = self._message
            message.data_set = BytesIO(self._memory.getvalue() if self._memory is not None else b"")
            if self.path is not None or self.error is not None:  # the handler answers either
                message._data_set_path = self.path if self.error is None else None
                message._data_set_file = cast(Any, self)

    def close(self) -> None:
        """What pynetdicom calls after the C-STORE handler (the file is closed already)."""

    def discard(self) -> None:
        """Remove the file (if it was not moved into the spool), and write nothing more."""
        with self._lock:
            self._started = True
            self._memory = None
            self._close()
            self._unlink()
        if self._on_discarded is not None:
            self._on_discarded(self)


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, receiving C-STORE data sets to disk and answering a C-STORE request
    it cannot turn into a primitive.

    Each message this provider starts gets an :class:`IncomingDataset` as its data set (with
    ``incoming_dir`` set): memory per association stays at about a PDU whatever the instance's size
    (pynetdicom held each data set in memory, up to ``max_instance_bytes``: +263 MB RSS under 4
    oversized C-STOREs at the 64 MiB cap). The files of messages not yet handled when the association
    ends are removed by :meth:`discard_incoming` (:class:`NodeRequestHandler` calls it as the
    association's thread ends).

    pynetdicom refuses to build a C-STORE primitive from a command whose Affected SOP Instance (or
    Class) UID is over 64 characters; it logged an error and aborted the association, so the sender
    got no answer for that instance at all (issue 23). Here such a request, once whole (data set
    included), is answered with 0xC000 and a reason, counted as ``invalid_uid``, and the association
    goes on. Done by wrapping ``decode_msg`` of each message this provider starts (an instance
    attribute, so it survives pynetdicom switching the message's class once its command is decoded).
    """

    on_refused: OnRefused | None = None
    incoming_dir: Path | None = None
    _incoming: set[IncomingDataset]
    _incoming_lock: threading.Lock

    @classmethod
    def adopt(
        cls, provider: DIMSEServiceProvider, on_refused: OnRefused | None, incoming_dir: Path | None = None
    ) -> NodeDIMSE:
        provider.__class__ = cls
        assert isinstance(provider, NodeDIMSE)
        provider.on_refused, provider.incoming_dir = on_refused, incoming_dir
        provider._incoming, provider._incoming_lock = set(), threading.Lock()
        return provider

    def receive_primitive(self, primitive: P_DATA) -> None:  # type: ignore[override]
        if self.message is None:
            message = DIMSEMessage()
            decode = message.decode_msg
            message.decode_msg = lambda p, assoc=None: self._decoded(message, decode(p, assoc))  # type: ignore[method-assign]
            if self.incoming_dir is not None:
                incoming = IncomingDataset(message, self.assoc, self.incoming_dir, self._forget)
                with self._incoming_lock:
                    self._incoming.add(incoming)
                message.data_set = cast(Any, incoming)  # pynetdicom only calls write() until it is whole
            self.message = message
        super().receive_primitive(primitive)

    def discard_incoming(self) -> int:
        """Remove the files of data sets never handled (the association ended); how many there were."""
        with self._incoming_lock:
            left, self._incoming = self._incoming, set()
        removed = 0
        for incoming in left:
            removed += incoming.path is not None and incoming.path.exists()
            incoming.discard()
        if removed:
            log.info("removed %d partial instances of an ended association from %s", removed, _requestor(self.assoc))
        return removed

    def _forget(self, incoming: IncomingDataset) -> None:
        with self._incoming_lock:
            self._incoming.discard(incoming)

    def _decoded(self, message: DIMSEMessage, complete: bool) -> bool:
        """``complete`` as pynetdicom's decoder said, except for a C-STORE request that cannot become a
        primitive: answered here and dropped (False: pynetdicom waits for the next message)."""
        if not complete:
            return complete
        incoming = message.data_set if isinstance(message.data_set, IncomingDataset) else None
        if incoming is not None:
            incoming.finish()
            if incoming.path is None and incoming.error is None:  # nothing on disk, nothing to answer
                incoming.discard()
        if not isinstance(message, C_STORE_RQ):
            return complete
        command = message.command_set
        # pynetdicom's own rule (utils.validate_uid: 1 to 64 characters, more with ENFORCE_UID_CONFORMANCE).
        invalid = [
            keyword
            for keyword in ("AffectedSOPInstanceUID", "AffectedSOPClassUID")
            if not validate_uid(UID(str(command.get(keyword) or "")))
        ]
        if not invalid:
            return True
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = command.get("MessageID", 0)
        if "AffectedSOPClassUID" not in invalid:
            rsp.AffectedSOPClassUID = command.get("AffectedSOPClassUID")
        rsp.Status = STATUS_CANNOT_UNDERSTAND
        rsp.ErrorComment = f"{invalid[0]} is not a valid UID"
        value = str(command.get(invalid[0]) or "")
        log.warning(
            "refused instance from %s: %s %r is not a valid UID", _requestor(self.assoc), invalid[0], value[:80]
        )
        if self.on_refused is not None:
            self.on_refused("invalid_uid")
        if incoming is not None:
            incoming.discard()
        self.send_msg(rsp, cast(int, message.context_id))
        self.message = None  # the next P-DATA starts a new message
        return False


def _requestor(assoc: Association) -> str:
    try:
        return f"{assoc.requestor.primitive.calling_ae_title.strip()}@{assoc.requestor.address}"
    except Exception:  # only for a log line
        return "peer"


class _Throttled:
    """At most one log line per key every ``every_s`` seconds, saying how many were left out: a flood of
    connections must not become a flood of log lines."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (-1e9, 0))
            if now - last < self.every_s:
                self._last[key] = (last, skipped + 1)
                return
            self._last[key] = (now, 0)
        if skipped:
            message += f" ({skipped} more like it in the last {self.every_s:.0f} s)"
        log.warning(message, *args)


@dataclass(eq=False)
class _Pending:
    """A connection whose A-ASSOCIATE-RQ has not arrived in full yet."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    tls_pending: bool
    buffer: bytearray = field(default_factory=bytearray)
    needed: int = 6  # the header first, then the whole PDU

    @property
    def host(self) -> str:
        return self.address[0]


class HandshakeGate:
    """Holds accepted connections until their A-ASSOCIATE-RQ (after the TLS handshake, with TLS) has
    arrived in full, all in one thread with a selector; only then does a connection get its
    association's threads and count against ``max_associations``.

    pynetdicom starts an association (two threads) for every accepted connection and counts it
    against ``maximum_associations`` before any request arrives; a partial request then held its slot
    for ``network_timeout_s`` (the socket read's limit, not ``acse_timeout_s``): 11 stalled or 300
    silent connections locked every peer out ("Local Limit Exceeded") and cost a thread each
    (issue 23). Here a pending connection costs a socket and its buffer; it must complete its request
    within ``timeout_s`` (``acse_timeout_s``); at most ``max_pending`` are held and at most
    ``max_per_host`` connections per address (pending or associated), the oldest pending one closed to
    make room for a new one. A scanner's request takes milliseconds, so it gets through whatever
    stalled connections are held; an attacker only ever evicts its own (or the oldest) connections.
    The first PDU must be an A-ASSOCIATE-RQ of at most ``MAX_ASSOCIATE_PDU`` bytes; anything else is
    answered with A-ABORT and one (throttled) warning.
    """

    def __init__(self, server: NodeServer, timeout_s: float, max_pending: int, max_per_host: int) -> None:
        self.server, self.timeout_s, self.max_pending, self.max_per_host = server, timeout_s, max_pending, max_per_host
        self._selector = selectors.DefaultSelector()
        self._pending: dict[_Pending, None] = {}  # insertion order: oldest first (all share one timeout)
        self._by_host: dict[str, dict[_Pending, None]] = {}
        self._incoming: deque[tuple[socket.socket, tuple[str, int]]] = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopped = False
        self.log = _Throttled()
        self._thread = threading.Thread(target=self._run, name="HandshakeGate", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Take an accepted connection (called by the accept loop)."""
        with self._lock:
            self._incoming.append((sock, address))
        with contextlib.suppress(OSError):  # full: the gate is awake anyway
            self._wake_w.send(b"\0")

    def pending(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stopped:
                timeout = 1.0
                if self._pending:
                    oldest = next(iter(self._pending))
                    timeout = min(timeout, max(0.0, oldest.deadline - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._take_incoming()
                    elif key.data in self._pending:  # not closed by an earlier event of this round
                        self._advance(key.data)
                self._expire()
        except Exception:  # never expected: say so, and keep refusing rather than leave sockets open
            log.exception("association handshake gate failed")
        finally:
            for item in list(self._pending):
                self._close(item)
            with self._lock:
                while self._incoming:
                    self.server.shutdown_request(self._incoming.popleft()[0])
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        while True:
            with self._lock:
                if not self._incoming:
                    return
                sock, address = self._incoming.popleft()
            host = address[0]
            from_host = self._by_host.get(host, {})
            if len(from_host) + self.server.associations(host) >= self.max_per_host:
                if not from_host:  # all of them are associations: no room for another
                    self.log.warning(
                        "too_many_from_host",
                        "refused a connection from %s: max_connections_per_host (%d) reached",
                        host,
                        self.max_per_host,
                    )
                    self.server.shutdown_request(sock)
                    continue
                self._evict(next(iter(from_host)), "max_connections_per_host")
            if len(self._pending) >= self.max_pending:
                self._evict(next(iter(self._pending)), "max_pending_connections")
            try:
                sock.setblocking(False)
                context = self.server.ssl_context
                if context is not None:
                    sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                item = _Pending(sock, address, time.monotonic() + self.timeout_s, context is not None)
                self._selector.register(sock, selectors.EVENT_READ, item)
            except (OSError, ValueError) as exc:
                log.debug("connection from %s lost before its request: %s", host, exc)
                self.server.shutdown_request(sock)
                continue
            self._pending[item] = None
            self._by_host.setdefault(host, {})[item] = None

    def _evict(self, item: _Pending, cap: str) -> None:
        self.log.warning(
            "evicted",
            "closed a connection from %s after %.1f s without a complete association request: %s reached",
            item.host,
            self.timeout_s - (item.deadline - time.monotonic()),
            cap,
        )
        self._close(item)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            item = next(iter(self._pending))
            if item.deadline > now:
                return
            if item.tls_pending:
                self.log.warning(
                    "tls", "TLS handshake with %s failed: not complete within %s s", item.host, self.timeout_s
                )
            else:
                self.log.warning(
                    "timeout",
                    "closed a connection from %s: no association request within %s s",
                    item.host,
                    self.timeout_s,
                )
            self._close(item)

    def _forget(self, item: _Pending) -> None:
        self._pending.pop(item, None)
        from_host = self._by_host.get(item.host)
        if from_host is not None:
            from_host.pop(item, None)
            if not from_host:
                del self._by_host[item.host]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(item.sock)

    def _close(self, item: _Pending, abort: bytes | None = None) -> None:
        self._forget(item)
        if abort is not None:
            with contextlib.suppress(OSError):
                item.sock.send(abort)
        self.server.shutdown_request(item.sock)

    def _wait_for(self, item: _Pending, events: int) -> None:
        self._selector.modify(item.sock, events, item)

    def _advance(self, item: _Pending) -> None:
        sock = item.sock
        try:
            if item.tls_pending:
                assert isinstance(sock, ssl.SSLSocket)
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self._wait_for(item, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self._wait_for(item, selectors.EVENT_WRITE)
                item.tls_pending = False
                self._wait_for(item, selectors.EVENT_READ)
            while len(item.buffer) < item.needed:
                try:
                    chunk = sock.recv(item.needed - len(item.buffer))
                except (BlockingIOError, ssl.SSLWantReadError):
                    return None
                except ssl.SSLWantWriteError:
                    return self._wait_for(item, selectors.EVENT_WRITE)
                if not chunk:  # the peer went away
                    return self._close(item)
                item.buffer += chunk
                if len(item.buffer) == 6 and item.needed == 6 and not self._check_header(item):
                    return None
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            if item.tls_pending:
                self.log.warning("tls", "TLS handshake with %s failed: %s", item.host, exc)
            else:
                log.debug("connection from %s lost before its request: %s", item.host, exc)
            return self._close(item)
        self._forget(item)
        try:
            sock.setblocking(True)
        except OSError:
            self.server.shutdown_request(sock)
            return None
        self.server.associate(sock, item.address, bytes(item.buffer))
        return None

    def _check_header(self, item: _Pending) -> bool:
        """Whether the first PDU is an A-ASSOCIATE-RQ of an acceptable length (then read it whole)."""
        pdu_type, claimed = item.buffer[0], int.from_bytes(item.buffer[2:6], "big")
        limit = pdu_limit(pdu_type, self.server.ae.maximum_pdu_size)
        if limit is None:
            self.log.warning("unknown_pdu", "closing connection from %s: unknown PDU type 0x%02X", item.host, pdu_type)
            self._close(item, _A_ABORT_UNRECOGNIZED)
        elif claimed > limit:
            self.log.warning(
                "claim",
                "closing connection from %s: PDU type 0x%02X claims %d bytes, more than %d",
                item.host,
                pdu_type,
                claimed,
                limit,
            )
            self._close(item, _A_ABORT_INVALID_LENGTH)
        elif pdu_type != 0x01:
            if pdu_type != 0x07:  # an A-ABORT needs no answer
                self.log.warning(
                    "unexpected",
                    "closing connection from %s: PDU type 0x%02X before any association",
                    item.host,
                    pdu_type,
                )
            self._close(item, None if pdu_type == 0x07 else _A_ABORT_UNEXPECTED)
        else:
            item.needed = 6 + claimed
            return True
        return False


class NodeRequestHandler(RequestHandler):
    """pynetdicom's handler for a connection whose A-ASSOCIATE-RQ the gate has read: the node's socket
    (given those bytes to return first) and DIMSE provider, set before the association starts, and the
    removal of any data set left half received when the association's thread ends (by then pynetdicom
    has stopped its DUL thread, the only writer)."""

    server: NodeServer

    def __init__(self, request: socket.socket, client_address: tuple[str, int], server: NodeServer, prefetched: bytes):
        self.prefetched = prefetched
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        assoc = self._create_association()
        server = self.server
        tune_socket(
            assoc,
            server.read_timeout_s,
            server.poll_interval_s,
            prefetched=self.prefetched,
            max_dataset_bytes=server.max_instance_bytes,
            on_oversize=None if server.on_refused is None else lambda: server.on_refused("too_large"),  # type: ignore[misc]
        )
        dimse = NodeDIMSE.adopt(assoc.dimse, server.on_refused, server.incoming_dir)
        run = assoc.run

        def run_then_discard() -> None:
            try:
                run()
            finally:
                dimse.discard_incoming()

        assoc.run = run_then_discard  # type: ignore[method-assign]  (Thread.start calls self.run)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the connection handling moved into :class:`HandshakeGate`.

    The accept loop only accepts (pynetdicom ran the TLS handshake there: one silent peer stalled every
    TLS association) and hands the connection to the gate; a connection gets its association (threads,
    a ``max_associations`` slot) only once its A-ASSOCIATE-RQ is whole, and is refused at once with
    A-ASSOCIATE-RJ (transient, local limit exceeded) when all slots are taken, without a thread.
    """

    read_timeout_s: float | None = None
    poll_interval_s: float | None = None
    max_instance_bytes: int | None = None
    on_refused: OnRefused | None = None
    incoming_dir: Path | None = None  # where C-STORE data sets are received (None: in memory, pynetdicom's way)
    gate: HandshakeGate | None = None

    def __init__(
        self,
        *args: Any,
        dicom: DicomSettings,
        on_refused: OnRefused | None = None,
        incoming_dir: Path | None = None,
        **kwargs: Any,
    ) -> None:
        # The kernel's queue of connections not yet accepted (socketserver's default is 5): the accept
        # loop drains it quickly, but a burst of connections must not be refused by the kernel.
        self.request_queue_size = dicom.listen_backlog
        self.read_timeout_s, self.poll_interval_s = dicom.network_timeout_s, dicom.poll_interval_ms / 1000.0
        self.max_instance_bytes, self.on_refused = dicom.max_instance_bytes, on_refused
        self.incoming_dir = incoming_dir
        super().__init__(*args, **kwargs)
        self.gate = HandshakeGate(
            self, dicom.acse_timeout_s, dicom.max_pending_connections, dicom.max_connections_per_host
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # type: ignore[return-value]

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        assert self.gate is not None
        self.gate.admit(request, client_address)

    def _associations(self) -> list[Association]:
        return [a for a in self.active_associations if a.is_alive()]

    def associations(self, host: str | None = None) -> int:
        """Associations running now (from ``host``)."""
        found = self._associations()
        if host is None:
            return len(found)
        return sum(1 for a in found if a.requestor.address == host)

    def associate(self, request: socket.socket, client_address: tuple[str, int], prefetched: bytes) -> None:
        """Start the association of a connection whose A-ASSOCIATE-RQ has arrived (called by the gate)."""
        if self.associations() >= self.ae.maximum_associations:
            assert self.gate is not None
            self.gate.log.warning(
                "busy",
                "refused an association from %s: max_associations (%d) in use",
                client_address[0],
                self.ae.maximum_associations,
            )
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(_ASSOCIATE_RJ_BUSY)
            self.shutdown_request(request)
            return
        try:
            NodeRequestHandler(request, client_address, self, prefetched)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def shutdown(self) -> None:
        super().shutdown()
        if self.gate is not None:
            self.gate.stop()


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


# pynetdicom versions whose internals this module was read against: DIMSEServiceProvider.receive_primitive
# and its ``message``; DIMSEMessage.decode_msg (writes each data set fragment to ``data_set`` and returns
# True once whole), message_to_primitive (copies ``_data_set_path`` / ``_data_set_file``) and
# StorageServiceClass.SCP (closes and unlinks ``_dataset_file.name`` after the handler);
# RequestHandler._create_association and the association's thread; AssociationSocket's recv / send /
# ready; ThreadedAssociationServer's request handling. All the same in 3.0.0 to 3.0.4. (2.1.1's DIMSE
# decoding is the same too, but 2.x requires pydicom < 2.5 and this project pydicom >= 3: never
# installed together, hence pyproject's pin.) On another version, read them again and extend this.
_VETTED_PYNETDICOM = ((3, 0),)


def check_pynetdicom() -> None:
    """RuntimeError, saying what to do, where this pynetdicom is not one the receiving side was vetted on:
    the limits on hostile peers (memory per association, the size cap, pending connections) rest on its
    internals, and receiving without them would reopen what issue 23 closed."""
    import pynetdicom

    version = str(getattr(pynetdicom, "__version__", "unknown"))
    try:
        vetted = tuple(int(p) for p in version.split(".")[:2]) in _VETTED_PYNETDICOM
    except ValueError:
        vetted = False
    # And what is used, should a vetted version number come with other code (a patched build).
    shaped = all(
        hasattr(owner, name)
        for owner, name in (
            (DIMSEServiceProvider, "receive_primitive"),
            (DIMSEMessage, "decode_msg"),
            (DIMSEMessage, "message_to_primitive"),
            (RequestHandler, "_create_association"),
            (AssociationSocket, "ready"),
        )
    )
    if not vetted or not shaped:
        supported = ", ".join(f"{major}.{minor}.x" for major, minor in _VETTED_PYNETDICOM)
        raise RuntimeError(
            f"pynetdicom {version} is installed, but the DICOM receiver (ctp_node.node.scp) depends on internals "
            f"of pynetdicom {supported} only: install a supported version (pip install 'pynetdicom>=3.0,<3.1', "
            "as pyproject.toml pins it) or vet this one (ctp_node/node/scp.py, _VETTED_PYNETDICOM)"
        )


def start_scp(
    dicom: DicomSettings, spool: Spool, on_stored: OnStored, metrics: NodeMetrics | None = None
) -> NodeServer:
    """Start listening in background threads; ``server.shutdown()`` stops it."""
    check_pynetdicom()
    if _config.STORE_RECV_CHUNKED_DATASET:  # pynetdicom would write each data set to the temp folder itself
        log.warning("pynetdicom's STORE_RECV_CHUNKED_DATASET is set: C-STORE data sets are copied from its temp folder")
    ae = build_ae(dicom)
    on_refused = None if metrics is None else (lambda reason: metrics.refused.labels(reason).inc())
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, on_stored, on_refused]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, handle_requested, [dicom]),
    ]
    server = ae.make_server(
        (dicom.bind_address, dicom.port),
        evt_handlers=handlers,
        ssl_context=ssl_context(dicom),
        server_class=NodeServer,
        dicom=dicom,
        on_refused=on_refused,
        incoming_dir=spool.incoming_dir,
    )
    # As AE.start_server(block=False) does, with our server class.
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer:{dicom.port}", daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info("listening as %s on %s:%d", dicom.ae_title, dicom.bind_address, dicom.port)
    return server
