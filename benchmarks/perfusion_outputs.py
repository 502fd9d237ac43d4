"""Time of a job's perfusion outputs beyond the inpainting (issue 13, item 4), on a 512 x 512 x 16 study.

The study: the default phantom at matrix 512, 16 slices, 61 s, 6 HU noise; its 1 s series stands for
the synthetic series (what the inpainting hands on) and its every-4-s sampling for the acquired one.
Timed separately: the perfusion analysis of each series (``compute_perfusion``), building the writers'
input (tissue curves, anatomy), and ``write_perfusion_outputs`` per output kind (quantitative maps,
colour maps, SR, SEG, QA report; both analyses). The reference images (the derived series' first
second) are written beforehand and not timed: the pipeline has them on disk already.

    nice -n 10 .venv/bin/python benchmarks/perfusion_outputs.py            # 512 x 512 x 16
    .venv/bin/python benchmarks/perfusion_outputs.py --matrix 128 --slices 8 --keep /tmp/out
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series.outputs import output_input, write_perfusion_outputs


class PeakRSS:
    """The process's largest resident set while running, sampled every 10 ms from /proc (Linux).

    ``ru_maxrss`` covers the whole process life, phantom generation included; this covers only the
    part the node itself does (analyses and outputs)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_bytes(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, self.now_bytes())

    def __enter__(self) -> PeakRSS:
        self.peak_bytes = self.now_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.now_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--duration", type=int, default=61)
    parser.add_argument("--keep", type=Path, default=None, help="write the outputs here and keep them")
    args = parser.parse_args()

    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start")
    cfg = PhantomConfig(matrix=args.matrix, slices=args.slices, duration_s=args.duration, noise_hu=6.0, seed=11)
    mark = time.perf_counter()
    study = generate_phantom(cfg)
    synthetic = sample_study(study, parse_schedule("every:1"))
    acquired = sample_study(study, parse_schedule("every:4"))
    print(
        f"phantom {args.matrix} x {args.matrix} x {args.slices} x {args.duration} s: {time.perf_counter() - mark:.1f} s"
    )
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    del study  # the node holds the two series, never the phantom they were sampled from

    folder = args.keep or Path(tempfile.mkdtemp(prefix="ctp-outputs-bench-"))
    first_second = dataclasses.replace(synthetic, hu=synthetic.hu[:1], times_s=synthetic.times_s[:1])
    references = write_study(first_second, folder / "reference", uid_seed="perfusion-outputs-bench")

    seconds: dict[str, float] = {}
    held_gb = PeakRSS().now_bytes() / 1e9  # the two series (and the interpreter) before the job's work
    with PeakRSS() as sampler:
        wall = time.perf_counter()
        cpu = time.process_time()
        mark = time.perf_counter()
        analysis = PerfusionSettings(pixel_mm=float(synthetic.spacing_mm[2]))  # as the node's pipeline runs it
        maps_synthetic = compute_perfusion(synthetic.hu, synthetic.times_s, voxel_ml, settings=analysis)
        seconds["analysis synthetic 1 s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        maps_acquired = compute_perfusion(acquired.hu, acquired.times_s, voxel_ml, settings=analysis)
        seconds["analysis acquired"] = time.perf_counter() - mark
        mark = time.perf_counter()
        data = output_input(
            maps_synthetic, synthetic.hu, references, "1.2.826.0.1.3680043.8.498.1", voxel_volume_ml=voxel_ml,
            acquired_maps=maps_acquired, acquired_hu=acquired.hu,
        )  # fmt: skip
        seconds["writer input (curves, anatomy)"] = time.perf_counter() - mark
        mark = time.perf_counter()
        per_kind: dict[str, float] = {}
        written = write_perfusion_outputs(data, folder / "outputs", seconds=per_kind)
        seconds["outputs (all)"] = time.perf_counter() - mark
        total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu

    files = sum(s.count for s in written)
    size = sum(p.stat().st_size for s in written for p in s.paths)
    for name, value in seconds.items():
        print(f"  {name:34} {value:7.1f} s")
    for name, value in per_kind.items():
        print(f"    {name:32} {value:7.2f} s")
    print(f"  {'total beyond the inpainting':34} {total_wall:7.1f} s wall, {total_cpu:.1f} s CPU")
    writers = seconds["outputs (all)"] + seconds["writer input (curves, anatomy)"]
    print(f"  {'writers only (input + outputs)':34} {writers:7.1f} s")
    core = maps_synthetic.volume_checks["core"].measured_ml
    withheld = " (withheld)" if "core" in maps_synthetic.withheld else ""
    print(f"{len(written)} series, {files} files, {size / 1e6:.1f} MB; core {core:.1f} mL{withheld}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"peak memory of the analyses and outputs {sampler.peak_bytes / 1e9:.2f} GB (resident before them, "
        f"the two series: {held_gb:.2f} GB); whole process, phantom generation included: {peak_gb:.1f} GB; "
        f"load {os.getloadavg()[0]:.1f} at end"
    )
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
