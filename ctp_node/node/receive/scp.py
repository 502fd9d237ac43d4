"""The receiving side: a pynetdicom SCP answering C-ECHO and C-STORE of CT and Enhanced CT images.

The C-STORE handler only writes the instance durably to the spool (without decoding its pixel data)
and reports it to ``on_stored``; it never waits on processing. The checks and the write are
``ctp_node.node.receive.ingest.accept_instance``, shared with STOW-RS (``ctp_node.web.stow``). Refusals
are explicit DICOM statuses with an ErrorComment, each counted in ``ctp_node_refused_instances{reason}``:
0xA700 (out of resources: the disk, the job store), 0xC000 (cannot understand: missing, invalid or
inconsistent UIDs, an unreadable header). Associations are refused for a wrong called AE title and, with an
allow-list, for a calling AE title / host pair not on it.

Hostile or broken peers (the socket layer, before any authentication; the socket is
``ctp_node.node.shared.dicom_transport.BulkReadSocket``, the SCU's too): a PDU may claim at most what
its type can hold (P-DATA-TF: our maximum PDU size plus its header; association PDUs 1 MiB), checked on
the 6-byte header before anything is allocated; every PDU must arrive whole within ``network_timeout_s``
and every send complete within it. Until its A-ASSOCIATE-RQ is whole (TLS handshake included, within
``acse_timeout_s``) a connection waits in the handshake gate
(``ctp_node.node.receive.handshake.HandshakeGate``), one thread for all, holding no association slot;
pending connections are capped in all and per host, the oldest closed to make room. A C-STORE data set
over ``max_instance_bytes`` ends the association (A-ABORT) as it arrives; a C-STORE whose command UIDs
are invalid is answered 0xC000 (:class:`NodeDIMSE`).

Memory per association is bounded by a PDU, not by an instance: a C-STORE data set goes to a file in the
spool's ``.incoming`` folder fragment by fragment as it arrives (:class:`IncomingDataset`), the handler
reads the header from that file and, once the instance is accepted, renames it into place (same
filesystem: no copy). A refused instance's file is removed by the handler, an association that ends
mid-instance (dropped, aborted, over the size cap) removes its partial files as its thread ends, and
the receiver sweeps ``.incoming`` before it listens (a crash). pynetdicom's own
``STORE_RECV_CHUNKED_DATASET`` does the same into the system temp folder (a copy, not a rename, to
reach the spool) and leaves the file behind when an association drops mid-instance, hence our own.

:class:`NodeDIMSE`, :class:`NodeRequestHandler`, ``BulkReadSocket`` and :class:`IncomingDataset` use
pynetdicom internals read in 3.0.0 to 3.0.4 (``_VETTED_PYNETDICOM``); :func:`check_pynetdicom` stops the
node with a clear error on any other version rather than receive without these limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import zlib
from collections.abc import Callable
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
from ctp_node.node.receive.handshake import HandshakeGate
from ctp_node.node.receive.ingest import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    Claim,
    OnRefused,
    OnStored,
    Origin,
    Refusal,
    accept_instance,
)
from ctp_node.node.shared.completeness import LAST_TAG_READ
from ctp_node.node.shared.dicom_status import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from ctp_node.node.shared.dicom_transport import tune_socket
from ctp_node.node.shared.health import ResourceHealth
from ctp_node.node.shared.spool import TMP_SUFFIX
from ctp_node.node.shared.storage import AnySpool
from ctp_node.permissions import FILE_MODE, make_dirs

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import P_DATA

    from ctp_node.node.shared.prometheus import NodeMetrics

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
    event: evt.Event,
    spool: AnySpool,
    on_stored: OnStored,
    on_refused: OnRefused | None = None,
    health: ResourceHealth | None = None,
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
                health=health,
            )
        except Refusal as refusal:
            return _failure(refusal.status, refusal.comment)
        finally:
            incoming.discard()  # moved into place, or refused: either way not left in .incoming
        return STATUS_SUCCESS
    return _handle_store_in_memory(event, origin, spool, on_stored, on_refused, health)


def _handle_store_in_memory(
    event: evt.Event,
    origin: Origin,
    spool: AnySpool,
    on_stored: OnStored,
    on_refused: OnRefused | None,
    health: ResourceHealth | None = None,
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
            health=health,
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


# A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded (as pynetdicom sends).
_ASSOCIATE_RJ_BUSY = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02])


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


# pynetdicom versions whose internals the receiving side was read against (this module, and the socket in
# ctp_node/node/shared/dicom_transport.py): DIMSEServiceProvider.receive_primitive
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
            f"pynetdicom {version} is installed, but the DICOM receiver (ctp_node.node.receive.scp) depends on "
            f"internals of pynetdicom {supported} only: install a supported version (pip install "
            "'pynetdicom>=3.0,<3.1', as pyproject.toml pins it) or vet this one (ctp_node/node/receive/scp.py, "
            "_VETTED_PYNETDICOM)"
        )


def start_scp(
    dicom: DicomSettings,
    spool: AnySpool,
    on_stored: OnStored,
    metrics: NodeMetrics | None = None,
    health: ResourceHealth | None = None,
) -> NodeServer:
    """Start listening in background threads; ``server.shutdown()`` stops it."""
    check_pynetdicom()
    if _config.STORE_RECV_CHUNKED_DATASET:  # pynetdicom would write each data set to the temp folder itself
        log.warning("pynetdicom's STORE_RECV_CHUNKED_DATASET is set: C-STORE data sets are copied from its temp folder")
    ae = build_ae(dicom)
    on_refused = None if metrics is None else (lambda reason: metrics.refused.labels(reason).inc())
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, on_stored, on_refused, health]),
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
