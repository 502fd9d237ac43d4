"""Runs the status page with uvicorn in a thread of `ctp-node serve`.

The socket is bound here, in the caller's thread, so that a port in use or a forbidden address is
an OSError the caller reports (uvicorn would log it and end only its own thread). uvicorn leaves
the signal handlers alone outside the main thread: `serve` keeps its own and stops this server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from ctp_node.config import Settings
from ctp_node.node.jobs import JobStore
from ctp_node.web.app import create_app

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv4 or IPv6; port 0: any free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
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
