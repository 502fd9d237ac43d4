"""The node's hardened DICOM socket, on both sides of an association.

``BulkReadSocket`` is the socket of every association the node takes part in, as acceptor (the SCP,
``ctp_node.node.receive.scp``) or requestor (the SCU): ``tune_socket`` installs it as a connection
opens. It checks each PDU's claimed length against :func:`pdu_limit` before anything is allocated,
times out a PDU that does not arrive whole, reads each PDU in as few calls as the kernel allows and
re-arms a quick ACK after each read (benchmarks/ingest.py, benchmarks/turnaround.py). It uses
pynetdicom internals (``AssociationSocket``'s ``recv`` / ``send`` / ``ready``): the receiving side checks
the installed version before it listens (``ctp_node.node.receive.scp.check_pynetdicom``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)


# The most a PDU of each type may claim, whatever our maximum PDU size (PS3.8 9.3). Association
# PDUs hold presentation contexts and user identity: a few KB in practice, 1 MiB is generous.
# A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long by definition.
MAX_ASSOCIATE_PDU = 1 << 20
MAX_SHORT_PDU = 64
PDATA_HEADER = 6  # some peers fill the PDV to the negotiated maximum, so its item header comes on top
# When a peer is told "no limit" (maximum length 0), what a P-DATA-TF may still claim.
MAX_UNLIMITED_PDATA = 64 << 20
# Source 2 (service provider), reason 6 (invalid PDU parameter value) or 1 (unrecognized PDU).
A_ABORT_INVALID_LENGTH = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
A_ABORT_UNRECOGNIZED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
# Source 0: the service user.
_A_ABORT_BY_USER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
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

    def _drop(self, reason: str, abort: bool, message: bytes = A_ABORT_INVALID_LENGTH) -> None:
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
            self._drop(f"unknown PDU type 0x{pdu_type:02X}", abort=True, message=A_ABORT_UNRECOGNIZED)
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
