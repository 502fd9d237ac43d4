"""Loopback ports for tests that start servers: a free one, and waiting until a process listens on it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process may still
    take it before the caller binds, which is as good as tests on a shared machine get)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 20) -> None:
    """Return once ``proc`` (or a process it started) listens on ``port``; RuntimeError if it exits first,
    TimeoutError after ``timeout_s``. Whose socket it is matters: ``free_port`` cannot reserve the port, and a
    test that took any listener for its server would talk to a stranger (a CI flake seen once). Where the
    socket's owner cannot be read (no /proc, another user's process), a connection that succeeds is taken
    as the server's, as before."""
    deadline = time.monotonic() + timeout_s
    while True:
        owned = _listener_owned_by(port, proc.pid)
        if owned is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
        elif owned:
            return
        if proc.poll() is not None:
            taken = " (another process listens there)" if _listening_inodes(port) else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}{taken}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on {port} within {timeout_s} s")
        time.sleep(0.05)


def _listener_owned_by(port: int, pid: int) -> bool | None:
    """Whether a socket listening on ``port`` belongs to ``pid`` or one of its descendants; None when that
    cannot be told (no /proc, or a process whose descriptors this user may not read)."""
    if not Path("/proc/net/tcp").exists():
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    targets = {f"socket:[{inode}]" for inode in inodes}
    unreadable = False
    for member in _process_tree(pid):
        try:
            descriptors = os.listdir(f"/proc/{member}/fd")
        except PermissionError:
            unreadable = True
            continue
        except OSError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(f"/proc/{member}/fd/{fd}") in targets:
                    return True
            except OSError:
                continue
    return None if unreadable else False


def _listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6) in this network namespace."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the parent column of /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        member = queue.pop()
        tree.append(member)
        queue.extend(children.get(member, []))
    return tree
