"""Hosts on one VM for multi-host tests: a Linux network namespace per host, joined by veth pairs to a
bridge that lives in a namespace of its own, and a private mount namespace with its own tmpfs for
each process a host runs, so that a folder one host writes is invisible to every other.

```
  root namespace (the VM): untouched, nothing added to it
  <prefix>-lan:   bridge "lan" (no address, no other interface)
                    |-- veth --> <prefix>-db       eth0 10.213.0.10   (PostgreSQL, ...)
                    |-- veth --> <prefix>-recv1    eth0 10.213.0.11   (ctp-node serve)
                    '-- ...
```

Every namespace has ``lo`` and one ``eth0`` on a private /24 and no route beyond it (no default
route, no IPv6), so a process in it can reach the other test hosts and nothing else. Names carry a
random suffix per ``Network``; ``Network.close`` (also run by ``with``) stops every process the hosts
started by PID, the last started first (its stop signal, then SIGKILL; then any process still in one
of its namespaces), then deletes
the namespaces (which takes their veths and the bridge with them). It is safe to call twice.

``Host.run(argv, log)`` starts ``argv`` as
``ip netns exec NS unshare --mount --propagation private sh -c 'mount -t tmpfs ... DIR && exec "$@"'``:
every program in the chain execs the next, so the Popen's PID is the program's own. The tmpfs at
``Host.data_dir`` lives as long as that process (and its children); in the root namespace the folder
stays empty.

Needs root and iproute2 (``ip``) and util-linux (``unshare``, ``nsenter``, ``setpriv``). Without them
the tests are skipped with the reason, except in CI (``CI`` set, or ``CTP_NODE_DEPLOY_CHECKS=required``),
where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET = "10.213.0"  # /24, private (RFC 1918), only ever inside the test's own namespaces
PREFIX_LEN = 24
TOOLS = ("ip", "unshare", "nsenter", "setpriv")


def required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CTP_NODE_DEPLOY_CHECKS") == "required"


def require_namespaces() -> None:
    """Skip (fail in CI) unless this process may make network namespaces: root, iproute2, util-linux."""
    problems = [] if os.geteuid() == 0 else ["not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"]
    problems += [f"{tool} is not installed (iproute2 / util-linux)" for tool in TOOLS if shutil.which(tool) is None]
    if problems:
        message = "multi-host tests need Linux network namespaces: " + "; ".join(problems)
        if required():
            pytest.fail(message)
        pytest.skip(message)


def _run(argv: list[str], timeout_s: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Started:
    proc: subprocess.Popen
    what: str
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 20


@dataclass
class Host:
    """One host: a network namespace with one address, and a folder made private per process."""

    network: Network
    name: str
    netns: str
    address: str
    data_dir: Path  # the tmpfs mount point of every process this host runs (empty outside them)
    processes: list[Started] = field(default_factory=list)

    def run(
        self,
        argv: list[str],
        log: Path,
        *,
        stop_signal: int = signal.SIGTERM,
        stop_timeout_s: float = 20,
        tmpfs_mb: int = 512,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        """``argv`` on this host, with its own tmpfs at ``data_dir``; output to ``log``. Stopped by PID
        with ``stop_signal`` when the network closes (or earlier by ``stop``), SIGKILL after ``stop_timeout_s``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        mount = 'mount -t tmpfs -o "size=$1,mode=0700" "ctpmh-$2" "$0" && shift 2 && exec "$@"'
        command = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private"]
        command += ["sh", "-c", mount, str(self.data_dir), f"{tmpfs_mb}m", self.name, *argv]
        with open(log, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
        started = Started(proc, f"{self.name}: {argv[0]}", stop_signal, stop_timeout_s)
        self.processes.append(started)
        self.network.started.append(started)
        return proc

    def exec(self, argv: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        """A short command in this host's network namespace (no private folder), its output captured."""
        return _run(["ip", "netns", "exec", self.netns, *argv], timeout_s=timeout_s, check=False)

    def exec_in(self, proc: subprocess.Popen, argv: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        """A short command that sees the files as the process ``proc`` of this host does (its mount
        namespace, with its tmpfs), its output captured."""
        return _run(["nsenter", "-t", str(proc.pid), "-m", "--", *argv], timeout_s=timeout_s, check=False)

    def files(self, proc: subprocess.Popen, folder: Path, pattern: str = "*") -> list[str]:
        """Files under ``folder`` as the process ``proc`` of this host sees them."""
        found = self.exec_in(proc, ["find", str(folder), "-type", "f", "-name", pattern])
        return sorted(line for line in found.stdout.splitlines() if line)

    def stop(self, proc: subprocess.Popen) -> None:
        for started in self.processes:
            if started.proc is proc:
                _stop(started)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL, as a crash (the host's other processes go on)."""
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def link_down(self) -> None:
        """Cut this host off the network (its processes go on)."""
        _run(["ip", "-n", self.netns, "link", "set", "eth0", "down"])

    def link_up(self) -> None:
        _run(["ip", "-n", self.netns, "link", "set", "eth0", "up"])


def _stop(started: Started) -> None:
    proc = started.proc
    if proc.poll() is None:
        os.kill(proc.pid, started.stop_signal)
        try:
            proc.wait(timeout=started.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class Network:
    """A bridge in its own namespace and hosts attached to it; a context manager that removes it all."""

    def __init__(self, folder: Path) -> None:
        require_namespaces()
        self.folder = folder
        self.suffix = secrets.token_hex(3)
        # The hosts' mount points: empty folders directly under /tmp, which every user may traverse (a
        # host process that is not root, e.g. PostgreSQL, could not enter pytest's private tmp_path).
        self.mounts = Path(tempfile.mkdtemp(prefix=f"ctpmh-{self.suffix}-"))
        self.mounts.chmod(0o755)
        self.prefix = f"ctpmh-{self.suffix}"
        self.lan = f"{self.prefix}-lan"
        self.hosts: dict[str, Host] = {}
        self.started: list[Started] = []  # every process of every host, in the order started
        self._made: list[str] = []  # namespaces this network created, in order
        self._closed = False
        try:
            self._add_namespace(self.lan)
            _run(["ip", "-n", self.lan, "link", "add", "lan", "type", "bridge"])
            _run(["ip", "-n", self.lan, "link", "set", "lan", "up"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        # No IPv6 (no router or neighbour solicitations, no link-local addresses): IPv4 on the /24 only.
        _run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
        _run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def add_host(self, name: str) -> Host:
        """A new host on the bridge with the next address (10.213.0.10 and up)."""
        assert not self._closed and name not in self.hosts and len(self.hosts) < 200
        index = len(self.hosts)
        netns = f"{self.prefix}-{name}"
        port = f"mh{self.suffix}p{index}"  # the bridge's side of the veth (at most 15 characters)
        address = f"{SUBNET}.{10 + index}"
        self._add_namespace(netns)
        # Made inside the host's namespace with its peer put straight into the bridge's: neither end is
        # ever in the root namespace.
        _run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.lan])
        _run(["ip", "-n", self.lan, "link", "set", port, "master", "lan", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        host = Host(self, name, netns, address, self.mounts / name)
        self.hosts[name] = host
        return host

    def close(self) -> list[str]:
        """Stop every process, delete every namespace; returns what had to be killed after its stop
        (for the test's log). Safe to call again."""
        notes: list[str] = []
        for started in reversed(self.started):  # clients before the servers they use
            try:
                _stop(started)
            except Exception as exc:  # go on: the namespaces must go whatever happens
                notes.append(f"stopping {started.what} (pid {started.proc.pid}): {exc}")
        present = _namespaces()
        for name in reversed(self._made):
            if name not in present:
                continue
            # Anything still running in the namespace was started by this network (a child of a host
            # process): SIGKILL by PID, bounded.
            for _ in range(3):
                pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:
                    notes.append(f"killed leftover pid {pid} in {name}")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
                    time.sleep(0.05)
            _run(["ip", "netns", "delete", name], check=False)
        self._closed = True
        for host in self.hosts.values():  # empty here: every tmpfs was in a process's own namespace
            if host.data_dir.is_dir():
                host.data_dir.rmdir()
        if self.mounts.is_dir():
            self.mounts.rmdir()
        left = _namespaces() & set(self._made)
        if left:
            raise RuntimeError(f"network namespaces left behind: {sorted(left)}")
        return notes
