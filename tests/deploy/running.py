"""The deployed configuration running on loopback: `ctp-node serve` from deploy/compose/ctp-node.toml and
Orthanc from deploy/compose/orthanc.json with the routing script (free ports, temporary folders).

The compose configuration keeps the spool in the object store ([storage.object_store], the seaweedfs
service): here a real SeaweedFS on loopback stands for that service (tests/storage/seaweed.py), its
bucket made as create-bucket makes it, the key pair passed as the compose file passes it
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the variables the TOML names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.tools import COMPOSE_DIR, need_program
from tests.peers import Orthanc, start_orthanc, stop_process
from tests.ports import free_port, wait_for_port
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3

SCRIPT = COMPOSE_DIR / "autoroute.lua"
ORTHANC_JSON = COMPOSE_DIR / "orthanc.json"


def node_env(tmp_path: Path, dicom_port: int, s3: SeaweedS3, **extra: str) -> dict[str, str]:
    """The compose configuration on loopback: own ports, SQLite in a temporary data folder, the object
    store's endpoint replaced by the test server's (the bucket and the credential wiring as configured)."""
    env = dict(os.environ)
    env.update(
        CTP_NODE_CONFIG=str(COMPOSE_DIR / "ctp-node.toml"),
        CTP_NODE_STORAGE__OBJECT_STORE__ENDPOINT=s3.endpoint,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        CTP_NODE_DICOM__BIND_ADDRESS="127.0.0.1",
        CTP_NODE_DICOM__PORT=str(dicom_port),
        CTP_NODE_STORAGE__DATA_DIR=str(tmp_path / "data"),
        CTP_NODE_JOBS__DATABASE_URL=f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite'}",
        CTP_NODE_METRICS__BIND_ADDRESS="127.0.0.1",
        CTP_NODE_METRICS__PORT=str(free_port()),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def start_node(tmp_path: Path, s3: SeaweedS3, **extra: str) -> tuple[subprocess.Popen, dict[str, str], int]:
    port = free_port()
    env = node_env(tmp_path, port, s3, **extra)
    (tmp_path / "data").mkdir(exist_ok=True)
    with open(tmp_path / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctp_node", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, proc, "ctp-node serve")
    except Exception:
        stop_process(proc)
        raise
    return proc, env, port


def start_deployed_orthanc(folder: Path, node_port: int) -> Orthanc:
    """Orthanc with the deployed configuration and routing script, the node at ``node_port``."""
    need_program("Orthanc", "apt-get install -y orthanc (.ci/run installs it)")
    config = json.loads(ORTHANC_JSON.read_text())
    config["DicomModalities"]["ctpnode"].update(Host="127.0.0.1", Port=node_port)
    config["LuaScripts"] = [str(SCRIPT)]
    return start_orthanc(folder, base=config)
