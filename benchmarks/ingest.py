"""Durable ingest: a 16-slice x 60-volume 512 x 512 study (960 instances) sent by DCMTK storescu.

Measures, in one run on this machine: (1) `ctp-node serve` (every instance fsync'd, renamed, its
folder fsync'd, a job-store row updated and an audit line written before Success), and (2) DCMTK's
`storescp` writing the same files (no fsync), both with TCP_NODELAY=1 and 128 KB PDUs on both sides;
(3) CPU time of assemble + to_model_grid + from_model_grid + write for the received series (the
inpainting is replaced by the acquired neighbours, since it is timed by `ctp-node bench`).

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
from tests.peers import free_port, wait_for_port  # noqa: E402


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
    """CPU time of the non-GPU stages, with the acquired volumes standing in for the model's output."""
    import numpy as np

    from ctp_node.series.assemble import assemble_series
    from ctp_node.series.derived import DerivedRecipe, write_derived_series
    from ctp_node.series.grid import from_model_grid, to_model_grid
    from model.planner import plan_inpainting

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    stages = {}
    start = cpu()
    series = assemble_series(files)
    stages["assemble"] = cpu() - start
    # Acquired every 4 s: keep volumes 0, 4, 8, ...
    from ctp_node.series import CTPSeries

    idx = np.arange(0, series.hu.shape[0], 4)
    by_uid = {_sop_uid(p): p for p in files}
    sparse_files = [by_uid[uid] for v in idx for uid in series.sop_instance_uids[v]]
    sparse = CTPSeries(
        hu=series.hu[idx],
        times_s=series.times_s[idx],
        origin=series.origin,
        spacing_mm=series.spacing_mm,
        direction=series.direction,
        sop_instance_uids=[series.sop_instance_uids[v] for v in idx],
        study_uid=series.study_uid,
        series_uid=series.series_uid,
        frame_of_reference_uid=series.frame_of_reference_uid,
        start=series.start,
    )
    mark = cpu()
    grid = to_model_grid(sparse)
    stages["to_model_grid"] = cpu() - mark
    plan = plan_inpainting(sparse.times_s, np.ones(len(idx)))
    synthetic = np.isin(plan.seconds, [t.second for t in plan.targets])
    times = plan.times_s
    slabs = [np.repeat(s[:1], len(times), axis=0) for s in grid.slabs]
    mark = cpu()
    hu_1s = from_model_grid(grid, slabs, synthetic, sparse, times)
    stages["from_model_grid"] = cpu() - mark
    recipe = DerivedRecipe(model_name="bench", model_version="bench", checkpoint_id="none", sampler="none", steps=1)
    mark = cpu()
    written = write_derived_series(hu_1s, times, synthetic, sparse, sparse_files, work / "derived", recipe=recipe)
    stages["write"] = cpu() - mark
    stages["total_cpu_s"] = sum(stages.values())
    stages["files_written"] = written.count
    return stages


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


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
