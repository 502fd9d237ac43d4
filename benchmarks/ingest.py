"""Durable ingest: a 16-slice x 60-volume 512 x 512 study (960 instances) sent by DCMTK storescu.

Measures, in one run on this machine: (1) `ctp-node serve` (every instance fsync'd, renamed, its
folder fsync'd, a job-store row updated and an audit line written before Success), and (2) DCMTK's
`storescp` writing the same files (no fsync), both with TCP_NODELAY=1 and 128 KB PDUs on both sides;
(3) the node's own path (``ctp_node.series.pipeline.run_series``) on the series acquired every 4 s:
wall time per stage (assemble, to_model_grid, from_model_grid, guardrail, write) and CPU time in all, with the
network replaced by linear interpolation on the model grid (``model.engine.LinearInpainter``; the
network is timed by `ctp-node bench`).

    .venv/bin/python benchmarks/ingest.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dcmtk import require  # noqa: E402
from tests.ports import free_port, wait_for_port  # noqa: E402


def write_study(folder: Path) -> list[Path]:
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study as write
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=512, slices=16, duration_s=60, noise_hu=10.0, seed=1))
    return write(sample_study(study, parse_schedule("every:1")), folder, uid_seed="ingest-bench")


def send(storescu: str, files: list[Path], port: int, aet: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    result = subprocess.run(
        [storescu, "-aec", aet, "-pdu", "131072", "127.0.0.1", str(port), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
    return elapsed


def bench_node(storescu: str, files: list[Path], work: Path) -> dict:
    port = free_port()
    env = dict(
        os.environ,
        CTP_NODE_DICOM__PORT=str(port),
        CTP_NODE_DICOM__BIND_ADDRESS="127.0.0.1",
        CTP_NODE_STORAGE__DATA_DIR=str(work / "node"),
        CTP_NODE_SERIES__QUIET_PERIOD_S="3600",
    )
    proc = subprocess.Popen([sys.executable, "-m", "ctp_node", "serve", "--log-level", "WARNING"], env=env)
    try:
        wait_for_port(port, proc, "ctp-node serve")
        seconds = send(storescu, files, port, "CTPNODE")
        spooled = list((work / "node" / "spool").rglob("*.dcm"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"seconds": seconds, "instances_spooled": len(spooled)}


def bench_storescp(storescu: str, storescp: str, files: list[Path], work: Path) -> dict:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(
        [storescp, "-pdu", "131072", "-od", str(out), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "storescp")
        seconds = send(storescu, files, port, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"seconds": seconds, "instances_written": len(list(out.iterdir()))}


def bench_pipeline_cpu(files: list[Path], work: Path) -> dict:
    """The node's path on every 4th volume, with linear interpolation standing in for the network."""
    from ctp_node.series.derived import DerivedRecipe
    from ctp_node.series.pipeline import SeriesPipeline, run_series
    from model.engine import LinearInpainter

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    # Acquired every 4 s: the instances of volumes 0, 4, 8, ... (the phantom writes one per slice per second).
    by_time: dict[str, list[Path]] = {}
    for path in files:
        by_time.setdefault(_acquisition_time(path), []).append(path)
    sparse_files = [p for k, t in enumerate(sorted(by_time)) if k % 4 == 0 for p in by_time[t]]
    recipe = DerivedRecipe(model_name="bench", model_version="bench", checkpoint_id="none", sampler="none", steps=1)
    pipeline = SeriesPipeline(LinearInpainter(), recipe)
    start = cpu()
    result = run_series(pipeline, sparse_files, work / "derived")
    stages = {f"{name}_wall_s": value for name, value in result.seconds.items() if name != "inpaint"}
    stages["total_cpu_s"] = cpu() - start
    stages["files_written"] = result.derived.count if result.derived else 0
    return stages


def _acquisition_time(path: Path) -> str:
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AcquisitionDate", "AcquisitionTime"])
    return f"{header.get('AcquisitionDate', '')}{header.get('AcquisitionTime', '')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    storescu, storescp = require("storescu"), require("storescp")
    with tempfile.TemporaryDirectory(prefix="ctp-ingest-") as tmp:
        work = Path(tmp)
        files = write_study(work / "study")
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        node = bench_node(storescu, files, work)
        dcmtk = bench_storescp(storescu, storescp, files, work)
        pipeline = bench_pipeline_cpu(files, work)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "instances": len(files),
        "megabytes": round(size_mb, 1),
        "ctp_node_serve_s": round(node["seconds"], 2),
        "dcmtk_storescp_s": round(dcmtk["seconds"], 2),
        "ratio_node_to_storescp": round(node["seconds"] / dcmtk["seconds"], 2),
        "instances_spooled": node["instances_spooled"],
        "pipeline_cpu_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in pipeline.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
