"""The handshake gate: accepted connections wait here until their A-ASSOCIATE-RQ is whole.

Only then does a connection get an association (pynetdicom's two threads and a ``max_associations``
slot, ``ctp_node.node.receive.scp.NodeServer``). One thread with a selector watches every pending
connection; the caps (``max_pending_connections``, ``max_connections_per_host``) and the deadline
(``acse_timeout_s``) are applied here, and the first PDU's type and claimed length are checked against
the transport's limits (``ctp_node.node.shared.dicom_transport.pdu_limit``).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ctp_node.node.shared.dicom_transport import A_ABORT_INVALID_LENGTH, A_ABORT_UNRECOGNIZED, pdu_limit

log = logging.getLogger(__name__)

# A-ABORT, source 2 (service provider), reason 2: unexpected PDU (anything but an A-ASSOCIATE-RQ first).
_A_ABORT_UNEXPECTED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2])


class GateServer(Protocol):
    """What the gate needs of the server it admits connections for (``NodeServer``)."""

    ae: Any  # pynetdicom's AE: its maximum_pdu_size
    ssl_context: ssl.SSLContext | None

    def associations(self, host: str | None = None) -> int: ...

    def associate(self, request: socket.socket, client_address: tuple[str, int], prefetched: bytes) -> None: ...

    def shutdown_request(self, request: socket.socket) -> None: ...


class Throttled:
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

    def __init__(self, server: GateServer, timeout_s: float, max_pending: int, max_per_host: int) -> None:
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
        self.log = Throttled()
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
            self._close(item, A_ABORT_UNRECOGNIZED)
        elif claimed > limit:
            self.log.warning(
                "claim",
                "closing connection from %s: PDU type 0x%02X claims %d bytes, more than %d",
                item.host,
                pdu_type,
                claimed,
                limit,
            )
            self._close(item, A_ABORT_INVALID_LENGTH)
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
