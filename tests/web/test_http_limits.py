"""The web server's own limits against hostile clients (issue 23 item 4): a deadline for the request
line and headers, and a cap on connections, so that stalled connections cannot hold the process's
file descriptors. Loopback only; every wait is bounded and generous, no assertion on how fast."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from ctp_node.config import OPEN_FILES_LIMIT, Settings, open_files_needed
from ctp_node.web import start_web
from tests.web.helpers import make_node

HEADER_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 8
PATIENCE_S = 20.0  # far beyond the deadline: only a server that never closes reaches it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("web-limits") / "data"
    settings, store = make_node(data, header_timeout_s=HEADER_TIMEOUT_S, max_connections=MAX_CONNECTIONS)
    started = start_web(settings, store, port=0)
    yield started
    started.stop()


def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=PATIENCE_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close: no TIME_WAIT
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; socket.timeout if it keeps the connection open."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        _read_until_closed(sock)
    except ConnectionResetError:  # closed with the request unread
        pass
    except TimeoutError:
        return False
    return True


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _healthz(server) -> int:
    with urllib.request.urlopen(server.url + "healthz", timeout=PATIENCE_S) as response:
        return response.status


def _wait_until_healthy(server) -> None:
    for _ in range(100):  # bounded: the stalled connections are gone after HEADER_TIMEOUT_S
        try:
            if _healthz(server) == 200:
                return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    raise AssertionError("/healthz never answered 200 again")


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /healthz HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: a"],
    ids=["silent", "request-line-only", "unfinished-headers"],
)
def test_a_connection_without_complete_headers_is_closed_after_the_deadline(server, sent):
    with _connect(server) as sock:
        sock.sendall(sent)
        assert _closed_by_server(sock), "the server held a connection with unfinished headers"
    _wait_until_healthy(server)


def test_a_client_trickling_its_headers_is_cut_off_although_never_idle(server):
    """The deadline is a total: one byte every 50 ms would reset an idle timeout forever."""
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Slow: " + b"a" * 1000
    with _connect(server) as sock:
        cut_off = False
        for byte in request:  # bounded: 1,000+ bytes at 50 ms is ~50 s, the deadline 0.5 s
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
            time.sleep(0.05)
        assert cut_off, "the server let a trickling client send its headers for ~50 s"


def test_a_kept_alive_connection_gets_the_deadline_for_its_next_request(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = b""
        while b"\r\n\r\nok" not in first:  # bounded by the socket timeout
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")
        assert _closed_by_server(sock)


def test_connections_beyond_the_cap_are_answered_503_and_closed_so_descriptors_stay_bounded(tmp_path):
    """Far more stalled connections than the cap: the server holds the cap's worth and answers the
    rest at once, so its descriptors stay bounded however many connect."""
    settings, store = make_node(tmp_path / "data", header_timeout_s=60, max_connections=MAX_CONNECTIONS)
    server = start_web(settings, store, port=0)
    held: list[socket.socket] = []
    flood: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):  # held: their deadline is 60 s away
            held.append(_connect(server))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
        # A client one beyond the cap is answered at once, without waiting for its headers; one that
        # reads its answer gets it whole (no reset although its request was never read).
        for _ in range(3 * MAX_CONNECTIONS):
            with _connect(server) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
                answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in answer
            assert b"x-content-type-options: nosniff" in answer
        # A flood that reads nothing: every connection is closed by the server, the held ones stay
        # held, and the server is left with no more descriptors than before (this process holds both
        # ends: its descriptors are the clients' plus the server's).
        before = _descriptors()
        for _ in range(12 * MAX_CONNECTIONS):
            flood.append(_connect(server))
            flood[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
        for sock in flood:
            assert _closed_by_server(sock), "a connection beyond the cap was held"
        for _ in range(100):  # bounded: refused connections linger at most LINGER_S
            left = _descriptors() - before - len(flood)
            if left <= 0:
                break
            time.sleep(0.05)
        assert left <= 0, f"the server kept {left} descriptors of {len(flood)} refused connections"
        for sock in held:  # the held ones go: the server has room again
            sock.close()
        _wait_until_healthy(server)
    finally:
        for sock in held + flood:
            sock.close()
        server.stop()


def test_the_default_caps_fit_the_deployed_descriptor_limit():
    """LimitNOFILE / ulimits.nofile (tests/deploy check they say OPEN_FILES_LIMIT) leave room for the
    defaults with the page and STOW-RS on; the caps, not the limit, are what a flood reaches first."""
    settings = Settings(web={"enabled": True, "token": {"env": "UNUSED_TOKEN_VARIABLE"}})
    assert open_files_needed(settings) <= OPEN_FILES_LIMIT
