"""Ingest into the object store vs the local spool (issue 22): the 960-instance study of
``benchmarks/ingest.py`` (16 slices x 60 volumes, 512 x 512) sent by DCMTK storescu to `ctp-node serve`,
once with the local spool (every instance fsync'd) and once with ``[storage.object_store]`` on a
SeaweedFS S3 server on loopback (every instance confirmed by the store's PUT before Success), in
alternating rounds so that both see the same machine.

    .venv/bin/python benchmarks/ingest_object_store.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import send, write_study  # noqa: E402
from tests.dcmtk import require  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(storescu: str, files: list[Path], data: Path, extra_env: dict[str, str]) -> tuple[float, float]:
    """(seconds storescu took, CPU seconds the node used meanwhile)."""
    port = free_port()
    env = dict(
        os.environ,
        CTP_NODE_DICOM__PORT=str(port),
        CTP_NODE_DICOM__BIND_ADDRESS="127.0.0.1",
        CTP_NODE_STORAGE__DATA_DIR=str(data),
        CTP_NODE_SERIES__QUIET_PERIOD_S="3600",
        **extra_env,
    )
    proc = subprocess.Popen([sys.executable, "-m", "ctp_node", "serve", "--log-level", "WARNING"], env=env)
    try:
        wait_for_port(port, proc, "ctp-node serve", timeout_s=60)
        time.sleep(1)  # the node's start-up work (imports, recovery) out of the way
        before = cpu_s(proc.pid)
        seconds = send(storescu, files, port, "CTPNODE")
        return seconds, cpu_s(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    storescu = require("storescu")
    with tempfile.TemporaryDirectory(prefix="ctp-ingest-s3-") as tmp:
        work = Path(tmp)
        files = write_study(work / "study")
        s3 = SeaweedS3(work / "seaweed")
        runs: dict[str, list[float]] = {"local": [], "object_store": []}
        node_cpu: dict[str, list[float]] = {"local": [], "object_store": []}
        store_cpu: list[float] = []
        loads = [load()]
        stored = 0
        try:
            for round_ in range(args.rounds):
                seconds, cpu = serve(storescu, files, work / f"local{round_}", {})
                runs["local"].append(seconds)
                node_cpu["local"].append(cpu)
                prefix = f"bench{secrets.token_hex(3)}/"
                object_env = {
                    "CTP_NODE_STORAGE__OBJECT_STORE": json.dumps(
                        {
                            "endpoint": s3.endpoint,
                            "bucket": BUCKET,
                            "prefix": prefix,
                            "access_key_id": {"env": "BENCH_S3_KEY"},
                            "secret_access_key": {"env": "BENCH_S3_SECRET"},
                        }
                    ),
                    "BENCH_S3_KEY": ACCESS_KEY,
                    "BENCH_S3_SECRET": SECRET_KEY,
                }
                assert s3.proc is not None
                weed_before = cpu_s(s3.proc.pid)
                seconds, cpu = serve(storescu, files, work / f"s3-{round_}", object_env)
                store_cpu.append(cpu_s(s3.proc.pid) - weed_before)
                runs["object_store"].append(seconds)
                node_cpu["object_store"].append(cpu)
                stored = len(s3.list_keys(f"{prefix}spool/"))
                loads.append(load())
                time.sleep(2)
        finally:
            s3.stop()
    best = {k: min(v) for k, v in runs.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "instances": len(files),
        "seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "ratio_best": round(best["object_store"] / best["local"], 2),
        "ratio_per_round": [round(s / lo, 2) for lo, s in zip(runs["local"], runs["object_store"])],
        "node_cpu_s": {k: [round(x, 2) for x in v] for k, v in node_cpu.items()},
        "seaweedfs_cpu_s": [round(x, 2) for x in store_cpu],
        "objects_stored_last_round": stored,
        "load_average_1_5_15_before_and_after_each_round": loads,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
