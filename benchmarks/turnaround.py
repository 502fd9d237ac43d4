"""Turnaround: DCMTK storescu (its defaults) -> ctp-node -> DCMTK storescp (its defaults).

One run on this machine, for a 60 s study sampled every 4 s (8 slices of 512 x 512, JPEG Lossless:
120 instances; the 1 s result: 456 instances):

1. The floor: DCMTK storescu -> DCMTK storescp, both with their defaults, of the same files.
2. Ingest into `ctp-node serve` from a default storescu and from a tuned one (TCP_NODELAY=1, which
   DCMTK reads from the environment, and --max-send-pdu 131072); the same with the node's quick
   ACKs switched off, to show what they are for.
3. The whole turnaround, defaults at both ends: first byte sent (storescu started) -> last result
   instance stored by storescp, broken down into ingest (storescu done), quiet period (series
   queued), processing (result written; includes the worker's claim) and delivery (last result file
   in storescp's folder). Processing uses a tiny random network and one sampler step, so that the
   network path is what is timed (`ctp-node bench` times the model).
4. Delivery of the result files alone, as the worker sends them (ctp_node.node.work.scu.send_files), to a
   default storescp and to a tuned one (TCP_NODELAY=1), with and without the node's quick ACKs,
   and DCMTK storescu -> storescp of the same files as the floor.

    .venv/bin/python benchmarks/turnaround.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dcmtk import require  # noqa: E402
from tests.peers import stop_process, wait_for  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402

TUNED = {"TCP_NODELAY": "1"}  # DCMTK's own switch for Nagle's algorithm
# The node with its quick ACKs off: the same code, the Linux option hidden.
NO_QUICKACK = (
    "import ctp_node.node.shared.dicom_transport as s; s._QUICKACK = None; from ctp_node.cli.main import app; app()"
)


def write_study(folder: Path, matrix: int, slices: int) -> list[Path]:
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study as write
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=matrix, slices=slices, duration_s=60, noise_hu=10.0, seed=3))
    series = sample_study(study, parse_schedule("every:4"))
    return write(series, folder, transfer_syntax="jpeg-lossless", uid_seed="turnaround-bench")


class Storescp:
    def __init__(self, folder: Path, tuned: bool) -> None:
        self.port, self.folder = free_port(), folder
        folder.mkdir(parents=True)
        env = dict(os.environ, **TUNED) if tuned else dict(os.environ)
        # +xa: accept the node's JPEG Lossless (and every other) transfer syntax; otherwise defaults.
        self.proc = subprocess.Popen(
            [require("storescp"), "+xa", "-od", str(folder), str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, self.proc, "storescp")

    def files(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.is_file()]

    def stop(self) -> None:
        stop_process(self.proc)


def storescu(files: list[Path], port: int, aet: str, tuned: bool) -> float:
    args = [require("storescu"), "-xs", "-aet", "SCANNER", "-aec", aet]
    if tuned:
        args += ["--max-send-pdu", "131072"]
    env = dict(os.environ, **TUNED) if tuned else dict(os.environ)
    start = time.perf_counter()
    result = subprocess.run([*args, "127.0.0.1", str(port), *map(str, files)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-800:]}")
    return time.perf_counter() - start


def node_config(work: Path, name: str, quiet_s: float, destination_port: int | None) -> tuple[Path, int]:
    import tomli_w

    from tests.integration.node_helpers import cpu_checkpoint, node_settings

    settings = node_settings(
        work / name, cpu_checkpoint(work / f"{name}.pt"), None,
        series={"quiet_period_s": quiet_s}, model={"sampler": "ddim", "steps": 1},
        jobs={"lease_s": 300, "heartbeat_s": 30},
    )  # fmt: skip
    data = settings.to_toml_dict()
    if destination_port:
        data["destinations"] = [{"name": "storescp", "host": "127.0.0.1", "port": destination_port, "ae_title": "ANY"}]
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path, settings.dicom.port


def start(verb: str, config: Path, log: Path, quickack: bool = True) -> subprocess.Popen:
    head = [sys.executable, "-m", "ctp_node"] if quickack else [sys.executable, "-c", NO_QUICKACK]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*head, verb, "--config", str(config), "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT
        )


def median_runs(runs: list[float]) -> dict:
    return {"median_s": round(statistics.median(runs), 3), "runs_s": [round(r, 3) for r in runs]}


def bench_floor(files: list[Path], work: Path, repeats: int) -> dict:
    runs = []
    for i in range(repeats):
        scp = Storescp(work / f"floor{i}", tuned=False)
        try:
            runs.append(storescu(files, scp.port, "ANY", tuned=False))
        finally:
            scp.stop()
    return median_runs(runs)


def bench_ingest(files: list[Path], work: Path, repeats: int, quickack: bool) -> dict:
    name = "ingest" if quickack else "ingest-noquickack"
    config, port = node_config(work, name, 3600, None)
    proc = start("serve", config, work / f"{name}.log", quickack)
    result = {}
    try:
        wait_for_port(port, proc, "ctp-node serve")
        for tuned in (False, True):
            runs = [storescu(files, port, "CTPNODE", tuned) for _ in range(repeats)]
            result["tuned_sender" if tuned else "default_sender"] = median_runs(runs)
    finally:
        stop_process(proc)
    return result


def _log_time(log: Path, fragment: str) -> float:
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if fragment in record.get("message", ""):
            return datetime.fromisoformat(record["time"]).timestamp()
    raise LookupError(f"{fragment!r} not in {log}")


def bench_turnaround(files: list[Path], work: Path, expected: int) -> tuple[dict, Path]:
    scp = Storescp(work / "turnaround-storescp", tuned=False)
    config, port = node_config(work, "turnaround", 2.0, scp.port)
    serve = start("serve", config, work / "turnaround-serve.log")
    worker = start("worker", config, work / "turnaround-worker.log")
    try:
        wait_for_port(port, serve, "ctp-node serve")
        time.sleep(5)  # the worker has loaded its network
        t0 = time.time()
        storescu(files, port, "CTPNODE", tuned=False)
        ingest_end = time.time()
        wait_for(lambda: len(scp.files()) >= expected, 1800, "the result at storescp", interval=0.2)
        time.sleep(1)
        last_stored = max(p.stat().st_mtime for p in scp.files())
        queued = _log_time(work / "turnaround-serve.log", "queued")
        audit = [json.loads(line) for line in (work / "turnaround" / "audit.jsonl").read_text().splitlines()]
        processed = next(datetime.fromisoformat(r["time"]).timestamp() for r in audit if r["event"] == "processed")
        result_dir = next(p for p in (work / "turnaround" / "results").glob("*/*/g*") if p.is_dir())
    finally:
        for proc in (worker, serve):
            stop_process(proc)
        scp.stop()
    parts = {
        "ingest_s": ingest_end - t0,
        "quiet_period_s": queued - ingest_end,
        "processing_s": processed - queued,
        "delivery_s": last_stored - processed,
        "total_s": last_stored - t0,
    }
    return {k: round(v, 3) for k, v in parts.items()} | {"result_instances": len(scp.files())}, result_dir


def bench_delivery(results: list[Path], work: Path, repeats: int) -> dict:
    import ctp_node.node.shared.dicom_transport as transport_module
    from ctp_node.node.shared.peer import Peer
    from ctp_node.node.work.scu import send_files

    out: dict = {}
    quickack = transport_module._QUICKACK
    for label, tuned, ack in (("default_receiver", False, quickack), ("tuned_receiver", True, quickack),
                              ("default_receiver_no_quickack", False, None)):  # fmt: skip
        runs = []
        for i in range(repeats):
            scp = Storescp(work / f"delivery-{label}-{i}", tuned=tuned)
            transport_module._QUICKACK = ack
            try:
                start_s = time.perf_counter()
                sent = send_files(results, Peer("127.0.0.1", scp.port, "ANY"), "CTPNODE")
                runs.append(time.perf_counter() - start_s)
                assert all(r.ok for r in sent) and len(scp.files()) == len(results)
            finally:
                transport_module._QUICKACK = quickack
                scp.stop()
        out[label] = median_runs(runs)
    out["dcmtk_floor"] = bench_floor(results, work / "delivery-floor", repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each transfer (the median is reported)")
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctp-turnaround-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = write_study(work / "study", args.matrix, args.slices)
        expected = args.slices * 57  # 1 s volumes from 0 to 56 s
        report = {
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
            "study": {"instances": len(files), "bytes": sum(p.stat().st_size for p in files)},
            "floor_storescu_to_storescp": bench_floor(files, work / "floor", args.repeats),
            "ingest": bench_ingest(files, work, args.repeats, quickack=True),
            "ingest_without_quickack": bench_ingest(files, work, args.repeats, quickack=False),
        }
        report["turnaround"], result_dir = bench_turnaround(files, work, expected)
        report["delivery"] = bench_delivery(sorted(result_dir.glob("*.dcm")), work, args.repeats)
    ingest, delivery = report["ingest"], report["delivery"]
    report["ratios"] = {
        "ingest_default_over_tuned": round(
            ingest["default_sender"]["median_s"] / ingest["tuned_sender"]["median_s"], 2
        ),
        "delivery_default_over_tuned": round(
            delivery["default_receiver"]["median_s"] / delivery["tuned_receiver"]["median_s"], 2
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
