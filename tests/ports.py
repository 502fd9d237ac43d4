"""Loopback ports for tests that start servers: a free one, and waiting until a process listens on it."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process may still
    take it before the caller binds, which is as good as tests on a shared machine get)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 20) -> None:
    """Return once ``proc`` accepts connections on ``port``; RuntimeError if it exits first,
    TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on {port} within {timeout_s} s") from None
            time.sleep(0.05)
