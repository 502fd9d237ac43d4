"""SeaweedFS's S3 server (`weed server -s3`, as tests/storage/seaweed.py starts it) on a test host: its
data in the host's tmpfs, every port on the host's address only (the namespace is private, so fixed
ports). The bucket is made, and keys are listed, by a short Python run on another host (the root
namespace cannot reach it)."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.multihost.hosts import Host
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, weed_binary

PORTS = {"master": 9333, "master_grpc": 19333, "volume": 8080, "volume_grpc": 18080, "filer": 8888}
PORTS |= {"filer_grpc": 18888, "s3": 8333, "s3_grpc": 18333}

# Run on a client host: wait (bounded) until the store takes a PUT, make the bucket, or list keys.
CLIENT = """
import json, sys, time
import boto3
from botocore.config import Config
endpoint, access, secret, bucket, action, arg, timeout_s = sys.argv[1:8]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access,
                      aws_secret_access_key=secret,
                      config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                    connect_timeout=2, read_timeout=10))
if action == "ready":
    deadline, last = time.monotonic() + float(timeout_s), None
    while time.monotonic() < deadline:
        try:
            try:
                client.head_bucket(Bucket=bucket)
            except Exception:
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=".ready", Body=b"1")
            client.delete_object(Bucket=bucket, Key=".ready")
            sys.exit(0)
        except Exception as exc:
            last = exc
            time.sleep(0.3)
    sys.exit(f"SeaweedFS did not take writes within {timeout_s} s: {last}")
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=arg)
print(json.dumps([item["Key"] for page in pages for item in page.get("Contents", ())]))
"""


@dataclass
class HostedS3:
    host: Host
    proc: object

    @property
    def endpoint(self) -> str:
        return f"http://{self.host.address}:{PORTS['s3']}"

    def _client(self, client: Host, action: str, arg: str = "", timeout_s: float = 60) -> str:
        argv = [sys.executable, "-c", CLIENT, self.endpoint, ACCESS_KEY, SECRET_KEY, BUCKET, action, arg]
        done = client.exec([*argv, str(timeout_s)], timeout_s=timeout_s + 30)
        if done.returncode != 0:
            raise RuntimeError(f"S3 {action} from {client.name}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def wait_ready(self, client: Host, timeout_s: float = 60) -> None:
        """Until the store takes writes (the bucket made), asked from ``client``."""
        self._client(client, "ready", timeout_s=timeout_s)

    def keys(self, client: Host, prefix: str = "") -> list[str]:
        return json.loads(self._client(client, "list", prefix))


def start_seaweed(host: Host, log: Path, folder: Path) -> HostedS3:
    """``weed server -s3`` on ``host`` (its data in the host's tmpfs; ``folder``: its S3 identities)."""
    config = folder / "s3.json"
    identity = {"name": "ctp", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    # weed also listens on Unix sockets named by port, /tmp/seaweedfs-<part>-grpc-<port>.sock (fixed in
    # the binary), which the network namespace does not make private: another weed on the VM on the same
    # ports (a developer's on the defaults, a second run of these tests) would take or answer them. So
    # weed gets a /tmp of its own (its mount namespace is private): a small tmpfs with only its data
    # folder (and in it the identities) bound into it, at the same path.
    inside = "/" + host.data_dir.relative_to("/tmp").as_posix() if host.data_dir.is_relative_to("/tmp") else None
    s3_config = host.data_dir / config.name if inside else config
    p, ip = PORTS, host.address
    command = [
        weed_binary(), "server", f"-dir={host.data_dir}", f"-ip={ip}", f"-ip.bind={ip}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=8",
        "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=256",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    if inside:
        # The weed binary too, when it lives under /tmp (a clone there: its venv's bin/), at the same path.
        binary_dir = Path(command[0]).parent
        binary_inside = "/" + binary_dir.relative_to("/tmp").as_posix() if binary_dir.is_relative_to("/tmp") else ""
        script = (
            'cp "$2" "$0/" && mount -t tmpfs -o size=16m,mode=1777 ctpmh-tmp /mnt && mkdir -p "/mnt$1"'
            ' && mount --bind "$0" "/mnt$1"'
            ' && { [ -z "$3" ] || { mkdir -p "/mnt$3" && mount --bind "$4" "/mnt$3"; }; }'
            ' && mount --move /mnt /tmp && shift 4 && exec "$@"'
        )
        args = [str(host.data_dir), inside, str(config), binary_inside, str(binary_dir)]
        command = ["sh", "-c", script, *args, *command]
    # weed takes its time over SIGTERM (tests/storage/seaweed.py): SIGKILL after 2 s.
    proc = host.run(command, log, stop_signal=signal.SIGTERM, stop_timeout_s=2, tmpfs_mb=1024)
    return HostedS3(host, proc)
