"""ctp-node processes and DICOM peers on test hosts (tests/multihost/hosts.py), and the scanner's send."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from ctp_node.config import Settings
from tests.dcmtk import require
from tests.multihost.hosts import Host

REPO = Path(__file__).resolve().parents[2]
DICOM_PORT = 11112  # every host has its own network namespace: the same port on each
AE_TITLE = "CTPNODE"
SUCCESS = re.compile(r"Received Store Response \(Success\)")


def write_config(path: Path, settings: Settings, **replace) -> Path:
    """The settings as TOML for a node process; ``replace``: whole top-level values (e.g. destinations)."""
    data = settings.to_toml_dict()
    data.update(replace)
    path.write_text(tomli_w.dumps(data))
    return path


def wait_echo(host: Host, proc: subprocess.Popen, ae_title: str, log: Path, timeout_s: float = 60) -> None:
    """Until the DICOM service ``proc`` runs on ``host`` answers C-ECHO (DCMTK echoscu on the host)."""
    echoscu = require("echoscu")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[-1]!r} on {host.name} exited with {proc.returncode}:\n{log.read_text()}")
        echo = host.exec([echoscu, "-to", "2", "-aec", ae_title, host.address, str(DICOM_PORT)], timeout_s=10)
        if echo.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no C-ECHO answer on {host.name} within {timeout_s} s:\n{log.read_text()}")
        time.sleep(0.3)


def start_node(host: Host, verb: str, config: Path, log: Path) -> subprocess.Popen:
    """`ctp-node serve` (waited for until it answers C-ECHO) or `ctp-node worker` on ``host``."""
    argv = [sys.executable, "-m", "ctp_node", verb, "--config", str(config), "--log-level", "INFO"]
    # A node stops on SIGTERM after its threads: the receiver's health check may be in a request
    # (object store: 2 x 5 s) and is joined for up to 30 s; under CI load a 20 s limit cut a clean stop.
    proc = host.run(argv, log, cwd=REPO, stop_timeout_s=60)
    if verb == "serve":
        wait_echo(host, proc, AE_TITLE, log)
    return proc


@dataclass
class Sent:
    receiver: str
    files: int
    returncode: int | None = None
    acknowledged: int = 0
    start: float = 0.0
    end: float = 0.0


def send_split(scanner: Host, receivers: list[Host], files: list[Path], logs: Path) -> list[Sent]:
    """The files dealt out in turn to the receivers (file i to receiver i mod n), each share sent by DCMTK
    storescu from ``scanner`` on one association, all associations at once; what each acknowledged."""
    storescu = require("storescu")
    shares = [files[i :: len(receivers)] for i in range(len(receivers))]
    results = [Sent(r.name, len(share)) for r, share in zip(receivers, shares, strict=True)]

    def send(receiver: Host, share: list[Path], result: Sent) -> None:
        argv = [storescu, "-v", "-to", "10", "-ta", "10", "-td", "30", "-aet", "CT_SCANNER1", "-aec", AE_TITLE]
        result.start = time.monotonic()
        done = scanner.exec([*argv, receiver.address, str(DICOM_PORT), *map(str, share)], timeout_s=120)
        result.end = time.monotonic()
        (logs / f"storescu-{receiver.name}.log").write_text(done.stdout + done.stderr)
        result.returncode = done.returncode
        result.acknowledged = len(SUCCESS.findall(done.stdout + done.stderr))

    threads = [
        threading.Thread(target=send, args=(r, share, result), daemon=True)
        for r, share, result in zip(receivers, shares, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    return results


def overlapped(sent: list[Sent]) -> bool:
    """Every association was open while every other was: the receivers held the series at once."""
    return max(s.start for s in sent) < min(s.end for s in sent)


def poll(read, done, timeout_s: float, interval_s: float = 0.3):
    """``read()`` until ``done(value)`` or ``timeout_s``; the last value either way (the caller asserts)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = read()
    return value
