"""The node's DICOM face under hostile peers, with the shipped defaults (issue 23 items 1 to 3).

Starts `ctp-node serve` (defaults but for the port, the data folder and a long quiet period) and
records, in one run on this machine:

1. stalled: how long a legitimate C-ECHO waits (and whether it is answered) while 12 connections
   hold part of an A-ASSOCIATE-RQ (more than max_associations); aim: answered within 2 s throughout;
2. silent: the same while 300 TCP connections are open and say nothing, and the node's thread count;
3. oversize: the node's RSS while 4 peers C-STORE a 300 MB instance each at once; aim: flat (each is
   cut off at dicom.max_instance_bytes);
4. turnaround: ingest-to-complete of a small study (storescu, one association; every instance durable
   in the spool before its Success) with the node idle and with 300 silent connections open,
   alternating, in the same run; aim: within 1.2x.

All peers are on loopback, from 127.0.0.1 (the legitimate peer shares the attacker's address: the
worst case for the per-host cap).

    .venv/bin/python benchmarks/hostile_peers.py [--json out.json] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dcmtk import require  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402

PARTIAL_RQ = b"\x01\x00\x00\x00\x00\xc8" + b"\x00\x01\x00\x00" + b"CTPNODE "  # 18 of 206 bytes


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def echo(port: int) -> tuple[bool, float]:
    """(answered Success, seconds it took) for one C-ECHO on a new association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPNODE")
    ok = False
    if assoc.is_established:
        ok = assoc.send_c_echo().get("Status") == 0x0000
        assoc.release()
    return ok, time.perf_counter() - start


def echo_series(port: int, seconds: float, every_s: float = 0.5) -> dict:
    results = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        results.append(echo(port))
        time.sleep(every_s)
    waits = [t for _, t in results]
    return {
        "echoes": len(results),
        "answered": sum(ok for ok, _ in results),
        "wait_median_s": round(statistics.median(waits), 3),
        "wait_max_s": round(max(waits), 3),
    }


def open_connections(port: int, count: int, payload: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if payload:
                sock.sendall(payload)
        except OSError:
            continue
        socks.append(sock)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def oversize_file(folder: Path, megabytes: int) -> Path:
    from pydicom.uid import generate_uid

    from tests.node.dicom_helpers import ct_instance

    path = folder / "oversize.dcm"
    ds = ct_instance(path, study=generate_uid(), series=generate_uid())
    side = int((megabytes * 1e6 / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(2 * side * side)
    ds.save_as(path, enforce_file_format=True)
    return path


def store_oversize(port: int, path: Path, results: list) -> None:
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file: the sender's memory stays small
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPNODE")
    if not assoc.is_established:
        results.append("not associated")
        return
    status = assoc.send_c_store(path)
    results.append(hex(status.Status) if "Status" in status else "aborted")
    assoc.release()


def bench_oversize(pid: int, port: int, path: Path, peers: int = 4) -> dict:
    before = proc_status(pid, "VmRSS")
    samples, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(proc_status(pid, "VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list = []
    start = time.perf_counter()
    senders = [threading.Thread(target=store_oversize, args=(port, path, results)) for _ in range(peers)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    elapsed = time.perf_counter() - start
    time.sleep(1.0)
    done.set()
    sampler.join()
    return {
        "peers": peers,
        "instance_mb": round(path.stat().st_size / 1e6),
        "results": results,
        "seconds": round(elapsed, 2),
        "rss_before_mb": round(before / 1024),
        "rss_peak_mb": round(max(samples) / 1024),
        "rss_after_mb": round(proc_status(pid, "VmRSS") / 1024),
        "rss_growth_mb": round((max(samples) - before) / 1024),
    }


def write_small_study(folder: Path) -> list[Path]:
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=128, slices=8, duration_s=30, noise_hu=10.0, seed=1))
    return write_study(sample_study(study, parse_schedule("every:1")), folder, uid_seed="hostile-bench")


def send_study(storescu: str, files: list[Path], port: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [storescu, "-aet", "SCANNER", "-aec", "CTPNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
    return time.perf_counter() - start


def bench_turnaround(storescu: str, files: list[Path], port: int, rounds: int) -> dict:
    idle, flooded = [], []
    for _ in range(rounds):  # alternating, so that a change in the machine's load hits both alike
        idle.append(send_study(storescu, files, port))
        silent = open_connections(port, 300)
        try:
            time.sleep(0.5)
            flooded.append(send_study(storescu, files, port))
        finally:
            close_all(silent)
        time.sleep(0.5)
    return {
        "instances": len(files),
        "rounds": rounds,
        "idle_s": [round(t, 2) for t in idle],
        "with_300_silent_s": [round(t, 2) for t in flooded],
        "ratio_median": round(statistics.median(flooded) / statistics.median(idle), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each stall or flood is held")
    parser.add_argument("--rounds", type=int, default=3, help="turnaround rounds (idle and flooded each)")
    parser.add_argument(
        "--only",
        default="stalled,silent,oversize,turnaround",
        help="comma-separated parts to run (default: all): stalled, silent, oversize, turnaround",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    storescu = require("storescu")
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="ctp-hostile-") as tmp:
        work = Path(tmp)
        port = free_port()
        env = dict(
            os.environ,
            CTP_NODE_DICOM__PORT=str(port),
            CTP_NODE_DICOM__BIND_ADDRESS="127.0.0.1",
            CTP_NODE_STORAGE__DATA_DIR=str(work / "node"),
            CTP_NODE_SERIES__QUIET_PERIOD_S="3600",
            CTP_NODE_SERIES__COMPLETE_QUIET_PERIOD_S="3600",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctp_node", "serve", "--log-level", "WARNING"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(work / "serve.log", "wb"),  # noqa: SIM115  (closed with the folder)
        )
        try:
            wait_for_port(port, proc, "ctp-node serve")
            assert echo(port)[0]
            time.sleep(1.0)
            result["idle"] = echo_series(port, 3)
            result["idle"]["threads"] = proc_status(proc.pid, "Threads")

            if "stalled" in parts:
                stalled = open_connections(port, 12, PARTIAL_RQ)
                try:
                    result["stalled_12"] = echo_series(port, args.seconds)
                    result["stalled_12"]["threads"] = proc_status(proc.pid, "Threads")
                finally:
                    close_all(stalled)
                time.sleep(1.0)

            if "silent" in parts:
                silent = open_connections(port, 300)
                try:
                    time.sleep(0.2)
                    result["silent_300"] = echo_series(port, args.seconds)
                    result["silent_300"]["threads"] = proc_status(proc.pid, "Threads")
                    result["silent_300"]["connections_still_open_by_node"] = sum(1 for s in silent if _still_open(s))
                finally:
                    close_all(silent)
                result["after_flood"] = echo_series(port, 2)

            if "oversize" in parts:
                big = oversize_file(work, 300)
                result["oversize_4x300mb"] = bench_oversize(proc.pid, port, big)
                big.unlink()
                spool = work / "node" / "spool"
                # What an aborted association leaves in the spool: nothing, once the node has cleaned up.
                result["oversize_4x300mb"]["files_left_in_spool"] = sum(1 for p in spool.rglob("*") if p.is_file())

            if "turnaround" in parts:
                files = write_small_study(work / "study")
                result["turnaround"] = bench_turnaround(storescu, files, port, args.rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log_lines = (work / "serve.log").read_text(errors="replace").splitlines()
            result["node_log_lines"] = len(log_lines)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
