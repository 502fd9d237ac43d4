"""``tests.ports.wait_for_port``: the listener must be the process waited for, not whoever holds the port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.ports import free_port, wait_for_port

LISTEN_THEN_SLEEP = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(30)\n"
)


@contextlib.contextmanager
def started(code: str, *args: str):
    """``python -c code args`` in a session of its own, killed with everything it started afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_returns_once_the_process_listens():
    port = free_port()
    with started("import time; time.sleep(0.3)\n" + LISTEN_THEN_SLEEP, str(port)) as proc:
        wait_for_port(port, proc, "listener", timeout_s=10)
        assert proc.poll() is None


def test_a_stranger_on_the_port_is_not_the_process():
    """The port is taken by someone else (here: this test); the process waited for fails to bind and exits.
    The wait must report that, not return because something answered on the port."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        expected = "exited with 3 before listening.*another process listens there"
        with (
            started("import time; time.sleep(0.5); raise SystemExit(3)") as proc,
            pytest.raises(RuntimeError, match=expected),
        ):
            wait_for_port(port, proc, "server", timeout_s=10)


def test_a_listening_child_counts_as_the_process():
    """Servers that fork (PostgreSQL, nginx) or run under a wrapper listen from a child."""
    port = free_port()
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {LISTEN_THEN_SLEEP!r}, '{port}'])"
    with started(child) as proc:
        wait_for_port(port, proc, "wrapper", timeout_s=10)


def test_no_listener_times_out():
    with started("import time; time.sleep(5)") as proc, pytest.raises(TimeoutError, match="did not listen"):
        wait_for_port(free_port(), proc, "sleeper", timeout_s=0.5)
