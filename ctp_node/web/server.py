"""Runs the status page with uvicorn in a thread of `ctp-node serve`.

The socket is bound here, in the caller's thread, so that a port in use or a forbidden address is
an OSError the caller reports (uvicorn would log it and end only its own thread). uvicorn leaves
the signal handlers alone outside the main thread: `serve` keeps its own and stops this server.

uvicorn bounds neither how long a connection may take to send its headers nor how many connections
it holds (its ``limit_concurrency`` answers 503 only to a complete request, so connections that never
finish one are held forever: issue 23, 1,000 held, then the process out of file descriptors broke
DICOM too). ``GuardedH11Protocol`` adds both, as ``[web] header_timeout_s`` and ``max_connections``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ctp_node.config import HTTP_LISTEN_BACKLOG, Settings, WebSettings
from ctp_node.node.shared.jobs import JobStore
from ctp_node.web.app import create_app

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int, backlog: int = HTTP_LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv4 or IPv6; port 0: any free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)  # also what one pass of the accept loop takes (open_files_needed)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# Sent to a connection beyond max_connections before it is closed: it never reached the app, so the
# app's security headers are written here.
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 5\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"cache-control: no-store\r\n"
    b"connection: close\r\n"
    b"content-length: 37\r\n"
    b"\r\n"
    b"too many connections; try again soon\n"
)


LINGER_S = 1.0  # how long a refused connection may take to read its 503


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for the request line and headers and a connection cap.

    The deadline runs from the moment a connection opens, and again from the first byte of each
    further request on a kept-alive connection; it is a total, not an idle timeout, so a peer that
    trickles one byte every few seconds is cut off too. The limits are class attributes: ``guarded``
    makes a subclass with the configured ones (uvicorn makes one protocol object per connection).
    """

    header_timeout_s: float = 10.0
    max_connections: int = 64
    # Refused connections waiting for the peer to read the 503 (see _refuse); one set per server.
    lingering: set[GuardedH11Protocol] = set()

    @classmethod
    def guarded(cls, web: WebSettings) -> type[GuardedH11Protocol]:
        attributes = {"header_timeout_s": web.header_timeout_s, "max_connections": web.max_connections}
        return type("GuardedH11Protocol", (cls,), {**attributes, "lingering": set()})

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_deadline: Any = None
        self._refused = False
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # this connection is already counted
            self._refuse()
            return
        self._arm_header_deadline()

    def _refuse(self) -> None:
        """Answer 503 and close, without reading the request.

        Closing a socket with unread request bytes in it sends a reset, which makes the peer discard
        the 503 it has not read yet: so the answer is followed by a FIN, what the peer still sends is
        read and dropped, and the socket closes when the peer closes or after LINGER_S. At most
        max_connections refused connections linger; beyond that they are closed at once (reset or
        not), so descriptors stay bounded at twice the cap under any flood.
        """
        self._refused = True
        log.debug("status page: %d connections, refusing one more", len(self.connections) - 1)
        self.transport.write(BUSY_RESPONSE)
        if len(self.lingering) >= self.max_connections or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering.add(self)
        self._header_deadline = self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request of a refused connection: dropped unread
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request's headers
            if self._header_deadline is None:  # a kept-alive connection starts its next request
                self._arm_header_deadline()
        else:  # the headers are in: the app has the request (bodies have their own limits)
            self._disarm_header_deadline()

    def eof_received(self) -> bool | None:
        if self._refused:
            return None  # the peer is done: the transport closes
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        self.lingering.discard(self)
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        # A request that arrived meanwhile (their_state moved on) is the app's to finish.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("status page: closing a connection without complete headers after %s s", self.header_timeout_s)
            self.transport.close()


class WebServer:
    """A started uvicorn server; ``stop()`` ends it (the thread is a daemon: it never holds the process)."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, thread: threading.Thread) -> None:
        self._server, self._socket, self._thread = server, sock, thread
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        """Where the page answers directly (a reverse proxy adds ``root_path`` in front, and strips it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()


def start_web(
    settings: Settings, store: JobStore, receiver: Any = None, *, port: int | None = None, ready_s: float = 15.0
) -> WebServer:
    """Serve the status page as ``[web]`` says (``port`` overrides it; 0 picks a free one).

    Raises OSError when the address cannot be bound, RuntimeError when the server does not start,
    WebConfigError (ValueError) when a configured secret cannot be used.
    """
    web = settings.web
    app = create_app(settings, store, receiver=receiver)
    sock = bind_socket(web.bind_address, web.port if port is None else port)
    config = uvicorn.Config(
        app,
        log_config=None,  # the node's logging stays as `serve` set it up
        root_path=web.root_path,
        proxy_headers=True,  # X-Forwarded-Proto/-For from a reverse proxy on this machine (deploy/README.md)
        forwarded_allow_ips="127.0.0.1,::1",
        server_header=False,
        lifespan="off",
        http=GuardedH11Protocol.guarded(web),  # h11 with the header deadline and connection cap
        backlog=HTTP_LISTEN_BACKLOG,  # with a socket given, asyncio accepts this many per pass before any is refused
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="status-page")
    thread.start()
    deadline = time.monotonic() + ready_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the status page did not start; the log above says why")
        time.sleep(0.02)
    started = WebServer(server, sock, thread)
    if not is_loopback(started.host):
        log.warning(
            "status page on %s, reachable from other machines without TLS: put a TLS reverse proxy in front "
            "(deploy/README.md) and keep bind_address on loopback",
            started.url,
        )
    behind = f" (served as {web.root_path}/ by a reverse proxy)" if web.root_path else ""
    log.info("status page on %s%s", started.url, behind)
    return started
