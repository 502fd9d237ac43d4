"""Real DICOM peers for integration tests, started on loopback ports and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.tools import need_program
from tests.ports import free_port, wait_for_port


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout_s: float = 90.0, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned), or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_steady(read, timeout_s: float = 30.0, what: str = "a steady value", samples: int = 5, interval: float = 0.1):
    """Poll ``read`` until it returns the same value ``samples`` times in a row (returned), or
    TimeoutError: a process gone quiet (its threads and descriptors back to rest), where a fixed
    sleep would guess how long that takes on a loaded machine."""
    seen: list = []

    def steady():
        seen.append(read())
        return len(seen) >= samples and all(v == seen[-1] for v in seen[-samples:])

    wait_for(steady, timeout_s, what, interval)
    return seen[-1]


@dataclass
class Orthanc:
    """A headless Orthanc PACS (Debian package) with its REST API on loopback."""

    proc: subprocess.Popen
    http_port: int
    dicom_port: int
    ae_title: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def upload(self, path: Path) -> None:
        request = urllib.request.Request(self.url + "/instances", data=Path(path).read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def instance_file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def stop(self) -> None:
        stop_process(self.proc)


def start_orthanc(
    folder: Path,
    ae_title: str = "ORTHANC",
    modalities: dict | None = None,
    dicom_port: int | None = None,
    base: dict | None = None,
    plugins: list[str] | None = None,
) -> Orthanc:
    """Orthanc on loopback ports with storage in ``folder`` (config and log there too). ``base``: a
    configuration to start from (e.g. the deployed orthanc.json); the test-only settings win.
    ``plugins``: shared libraries to load (e.g. the DICOMweb plugin), none by default."""
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc (Debian package orthanc) is not installed; .ci/run installs it")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), dicom_port or free_port()
    config = dict(base) if base is not None else {"Name": "ctp-node-test", "DicomAet": ae_title}
    if base is None or modalities is not None:
        config["DicomModalities"] = modalities or {}
    config.setdefault("DicomCheckCalledAet", True)
    config.update(
        HttpPort=http_port,
        DicomPort=dicom_port,
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        StorageDirectory=str(folder / "storage"),
        IndexDirectory=str(folder / "index"),
        StableAge=1,
        Plugins=list(plugins or []),
    )
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(http_port, proc, "Orthanc")
        wait_for_port(dicom_port, proc, "Orthanc DICOM")
    except Exception:
        proc.kill()
        raise
    return Orthanc(proc, http_port, dicom_port, config["DicomAet"])


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A one-day self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem) in ``folder``."""
    openssl = need_program("openssl", "apt-get install openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
