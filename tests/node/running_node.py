"""`ctp-node serve` as a real process for tests of its network face: its settings, C-ECHO, its
Prometheus metrics, and what /proc says about it (memory, threads, open files)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.integration.node_helpers import node_settings, write_config
from tests.peers import stop_process
from tests.ports import free_port, wait_for_port

PORT_ATTEMPTS = 3


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status value in kB (VmRSS, VmHWM) or a count (Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_files(pid: int) -> list[str]:
    """What the process's descriptors point to (sockets as socket:[inode])."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(found)


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the node sends until it closes the connection (TimeoutError if it does not)."""
    sock.settimeout(limit_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise TimeoutError(f"the node kept the connection open for {limit_s} s") from None
    return received


class RunningNode:
    """`ctp-node serve` in ``folder`` (its working directory; data under ``folder/data``)."""

    def __init__(self, folder: Path, timeout_s: float, **dicom) -> None:
        self.folder = folder
        self.log = folder / "serve.log"
        self.workdir = folder / "cwd"
        self.workdir.mkdir()
        dicom = {"network_timeout_s": timeout_s, "acse_timeout_s": timeout_s, "max_associations": 10, **dicom}
        # A port that was free when chosen can be taken before the node binds it (CI saw it once: the node
        # exited with "Address already in use" while another process answered on the port). ``wait_for_port``
        # waits for the node's own socket; when the node says it could not bind, another port is chosen.
        for _ in range(PORT_ATTEMPTS):
            self.metrics_port = free_port()
            self.settings = node_settings(
                folder / "data", folder / "unused.pt", None, dicom=dicom, metrics={"port": self.metrics_port}
            )
            self.port = self.settings.dicom.port
            config = write_config(folder / "node.toml", self.settings)
            start = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "ctp_node", "serve", "--config", str(config), "--log-level", "INFO"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                )
            try:
                wait_for_port(self.port, self.proc, "ctp-node serve", timeout_s=30)
                return
            except RuntimeError:
                said = self.log.read_bytes()[start:].decode(errors="replace")
                if "cannot listen on" not in said:
                    raise RuntimeError(f"ctp-node serve exited before listening: {said[-2000:]}") from None
                stop_process(self.proc)
        raise RuntimeError(f"ctp-node serve found every port taken ({PORT_ATTEMPTS} tries): {self.log}")

    def echo(self, tls: ssl.SSLContext | None = None, source: str = "127.0.0.1") -> bool:
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 5
        ae.add_requested_context(Verification)
        tls_args = (tls, "localhost") if tls else None
        assoc = ae.associate("127.0.0.1", self.port, ae_title="CTPNODE", tls_args=tls_args, bind_address=(source, 0))
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return status.get("Status") == 0x0000

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def threads(self) -> int:
        return proc_status(self.proc.pid, "Threads")

    def fds(self) -> int:
        """Open descriptors, less those of the job store: its connection pool grows to as many
        connections as threads used it at once (bounded by the pool), which is not a leak."""
        return sum(1 for target in open_files(self.proc.pid) if "jobs.sqlite" not in target)

    def open_files(self) -> list[str]:
        return open_files(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
