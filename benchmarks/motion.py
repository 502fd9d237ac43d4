"""Motion correction (``ctp_node.series.motion``) on phantom studies with simulated motion.

Every study is a default-family phantom (192 x 192 x 8 at 1.25 mm, 5 mm slices, 61 s at 1 s,
partial volume: ``supersample=3``, 6 HU noise) with, at volumes drawn per seed:

- rescuable: 4 volumes with the whole head in another pose (in-plane rotation up to 3 deg, in-plane
  translation up to 3 mm, tilts up to 1 deg, through-plane translation up to 1 mm), one of them in
  the baseline;
- not rescuable (the truth of "corrupted"): a step between slices (slices from a random one up
  moved 2-4 mm in-plane), one shifted slice (2-4 mm), motion during one volume (blur: mean of 5
  poses along a 3-4 deg, 2 mm sweep), and a baseline volume 6 HU off (a calibration offset, added
  to the image: the phantom has no such artefact).

Reported per study: which volumes were flagged against the corrupted ones (precision, recall), the
rescuable moves flagged, the registration error of the rescued moves (largest displacement error
on points of the head, mm), the timings, and perfusion (``compute_perfusion``) of the motion-free
twin study (same seed and noise, no motion; also with the flagged volumes left out), the moved
series without repair, registered only, with the flagged volumes left out but not registered, and
registered with the flagged volumes left out (the node inpaints them; leaving them out is what
linear interpolation across them gives the analysis), each against the true maps.

    .venv/bin/python benchmarks/motion.py                        # 6 studies, automatic brain mask
    .venv/bin/python benchmarks/motion.py --given-brain-mask     # the true mask: unrepaired series analysable
    .venv/bin/python benchmarks/motion.py --interpolation bspline
    .venv/bin/python benchmarks/motion.py --sensitivity --seeds 0,1   # detection against corruption size
    .venv/bin/python benchmarks/motion.py --timing               # 512 x 512 x 16 x 61 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from SimpleITK import Euler3DTransform

from ctp_node.config import MotionSettings
from ctp_node.errors import PerfusionError
from ctp_node.evaluation.perfusion_accuracy import accuracy
from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.perfusion.lesion import convention_masks
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.motion import RigidMotion, SliceMotion
from ctp_node.series import CTPSeries
from ctp_node.series.motion import correct_motion

LESIONS = ((40.0, -5.0, 5.0), (-38.0, 5.0, 0.0), (42.0, 12.0, 8.0), (-40.0, -10.0, 5.0))
BASELINE_OFFSET_HU = 6.0
VARIANTS = (
    "motion-free", "motion-free, flagged left out", "no repair", "registered only", "flagged left out only", "repaired",
)  # fmt: skip


def motion_plan(seed: int, slices: int, duration: int) -> tuple[tuple[SliceMotion, ...], dict[int, str], int]:
    """The study's motions, {volume: kind} of the corrupted ones, and the volume given a baseline offset."""
    rng = np.random.default_rng(1000 + seed)
    volumes = rng.permutation(np.arange(8, duration))[:6].tolist()
    baseline = rng.permutation(np.arange(3, 7))[:2].tolist()  # after the 3 reference volumes, before the bolus
    motions, corrupted = [], {}
    for v in [baseline[0], *volumes[:3]]:  # rescuable rigid moves
        rotation = (*rng.uniform(-1, 1, 2), rng.uniform(-3, 3))
        translation = (*rng.uniform(-3, 3, 2), rng.uniform(-1, 1))
        motions.append(SliceMotion(v, 0, slices - 1, tuple(rotation), tuple(translation)))
    step_volume, slice_volume, blur_volume = volumes[3:6]
    first = int(rng.integers(2, slices - 1))
    shift = rng.uniform(2, 4) * _unit(rng)
    motions.append(SliceMotion(step_volume, first, slices - 1, translation_mm=tuple(shift)))
    corrupted[step_volume] = "step between slices"
    one = int(rng.integers(1, slices - 1))
    motions.append(SliceMotion(slice_volume, one, one, translation_mm=tuple(rng.uniform(2, 4) * _unit(rng))))
    corrupted[slice_volume] = "shifted slice"
    sweep = (0.0, 0.0, float(rng.uniform(3, 4) * rng.choice([-1, 1])))
    motions.append(SliceMotion(blur_volume, 0, slices - 1, sweep, tuple(2.0 * _unit(rng)), sweep_steps=5))
    corrupted[blur_volume] = "motion during the volume"
    corrupted[baseline[1]] = "baseline offset"
    return tuple(motions), corrupted, baseline[1]


def _unit(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    return np.array([np.cos(angle), np.sin(angle), 0.0])


def pose_error_mm(motion: SliceMotion, found, centre) -> float:
    """Largest distance between where the phantom put head points and where the registration says."""
    pose = RigidMotion(motion.volume, motion.rotation_deg, motion.translation_mm, motion.centre_mm)
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 500)
    points = np.stack([70 * np.cos(angle), 88 * np.sin(angle), rng.uniform(-15, 15, 500)], axis=1)
    truth = (points - np.asarray(pose.centre_mm)) @ pose.rotation().T + np.asarray(pose.centre_mm)
    truth = truth + np.asarray(pose.translation_mm)
    estimated = Euler3DTransform(centre, *np.radians(found.rotation_deg), found.translation_mm)
    got = np.array([estimated.TransformPoint(tuple(p)) for p in points])
    return float(np.linalg.norm(got - truth, axis=1).max())


BRAIN_MASK = {"given": False}  # --given-brain-mask: the analysis gets the true skull-stripped mask
MOTION = {"settings": MotionSettings()}  # --interpolation


def perfusion(hu, times, study, keep=None) -> dict[str, float]:
    keep = np.ones(times.size, dtype=bool) if keep is None else keep
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    truth = study.truth
    truth_masks = convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml)
    settings = PerfusionSettings(pixel_mm=float(study.spacing_mm[2]))
    try:
        brain = truth.brain_mask if BRAIN_MASK["given"] else None
        maps = compute_perfusion(hu[keep], times[keep], voxel_ml, brain_mask=brain, settings=settings)
    except PerfusionError as exc:  # motion can leave no analysable series at all: that is a result
        return {"error": str(exc)}
    row = accuracy(maps, study, truth_masks)
    from ctp_node.perfusion.compare import region_median_error
    from ctp_node.phantom.tissue import TissueLabel

    grey = truth.labels == TissueLabel.GREY_MATTER
    row["cbf_gm_rel"] = region_median_error(maps.cbf, truth.cbf, grey)
    row["core_err_ml"] = row["core_ml"] - row["core_true_ml"]
    row["tmax6_err_ml"] = row["tmax6_ml"] - row["tmax6_true_ml"]
    return row


def run_study(seed: int, noise: float) -> dict:
    base = dict(matrix=192, slices=8, duration_s=61, noise_hu=noise, supersample=3, seed=seed)
    base["lesion_centre_mm"] = LESIONS[seed % len(LESIONS)]
    motions, corrupted, offset_volume = motion_plan(seed, 8, 61)
    mark = time.perf_counter()
    still = generate_phantom(PhantomConfig(**base))
    moved = generate_phantom(PhantomConfig(**base, slice_motions=motions))
    hu = moved.hu.copy()
    head = hu[offset_volume] > -500
    hu[offset_volume][head] += np.float32(BASELINE_OFFSET_HU)
    generate_s = time.perf_counter() - mark
    series = CTPSeries(hu, moved.times_s, tuple(moved.origin_mm), moved.spacing_mm)
    result = correct_motion(series, MOTION["settings"])

    flagged = set(np.flatnonzero(~result.usable).tolist())
    truth = set(corrupted)
    rescuable = {m.volume: m for m in motions if m.volume not in truth}
    row = {
        "seed": seed,
        "flagged": sorted(flagged),
        "corrupted": {v: corrupted[v] for v in sorted(corrupted)},
        "true_positive": len(flagged & truth),
        "false_positive": len(flagged - truth),
        "false_negative": len(truth - flagged),
        "rescuable_flagged": sorted(flagged & set(rescuable)),
        "rescued_error_mm": [
            round(pose_error_mm(m, result.volumes[v], result.centre_mm), 2) for v, m in rescuable.items()
        ],
        "reasons": {v.volume: v.reasons for v in result.volumes if v.reasons},
        "seconds_motion": result.seconds,
        "seconds_generate": generate_s,
    }
    times = series.times_s
    row["maps"] = {
        "motion-free": perfusion(still.hu, times, still),
        # What leaving the flagged volumes out costs by itself, without any motion.
        "motion-free, flagged left out": perfusion(still.hu, times, still, keep=result.usable),
        "no repair": perfusion(hu, times, moved),
        "registered only": perfusion(result.series.hu, times, moved),
        "flagged left out only": perfusion(hu, times, moved, keep=result.usable),
        "repaired": perfusion(result.series.hu, times, moved, keep=result.usable),
    }
    return row


def timing(noise: float) -> None:
    """correct_motion on a clinical-size study (512 x 512 x 16 slices x 61 s) with the seed-0 motions."""
    motions, _, _ = motion_plan(0, 16, 61)
    cfg = PhantomConfig(matrix=512, slices=16, duration_s=61, noise_hu=noise, seed=0, slice_motions=motions)
    study = generate_phantom(cfg)
    series = CTPSeries(study.hu, study.times_s, tuple(study.origin_mm), study.spacing_mm)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    start, cpu = time.perf_counter(), time.process_time()
    result = correct_motion(series)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"512 x 512 x 16 x 61: {wall:.1f} s wall, {cpu:.1f} s CPU; stages " + ", ".join(
        f"{k} {v:.1f}" for k, v in result.seconds.items()))  # fmt: skip
    print(f"corrected {int(result.corrected.sum())}, unusable {np.flatnonzero(~result.usable).tolist()}")


SHIFTS_MM = (0.5, 1.0, 1.5, 2.0, 3.0)  # one slice shifted in-plane
SWEEPS_DEG = (1.0, 2.0, 3.0, 4.0)  # in-plane rotation during the volume (blur), no translation


def sensitivity(seeds: list[int], noise: float) -> None:
    """Which corruptions are flagged, by size: one study per seed with a shifted slice of each size
    and a blurred volume of each sweep, at volumes drawn per seed."""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    for seed in seeds:
        rng = np.random.default_rng(2000 + seed)
        volumes = rng.permutation(np.arange(8, 61))[: len(SHIFTS_MM) + len(SWEEPS_DEG)].tolist()
        motions, label = [], {}
        for v, mm in zip(volumes, SHIFTS_MM, strict=False):
            z = int(rng.integers(1, 7))
            motions.append(SliceMotion(v, z, z, translation_mm=tuple(mm * _unit(rng))))
            label[v] = f"slice shift {mm:g} mm"
        for v, deg in zip(volumes[len(SHIFTS_MM) :], SWEEPS_DEG, strict=True):
            motions.append(SliceMotion(v, 0, 7, (0.0, 0.0, deg), sweep_steps=5))
            label[v] = f"blur {deg:g} deg (about {np.radians(deg) * 80:.1f} mm at the skull)"
        cfg = PhantomConfig(
            matrix=192, slices=8, duration_s=61, noise_hu=noise, supersample=3, seed=seed, slice_motions=tuple(motions)
        )
        study = generate_phantom(cfg)
        result = correct_motion(CTPSeries(study.hu, study.times_s, tuple(study.origin_mm), study.spacing_mm))
        print(f"seed {seed}: other volumes flagged {[t for t in np.flatnonzero(~result.usable) if t not in label]}")
        for v in sorted(label, key=lambda v: label[v]):
            r = result.volumes[v]
            print(
                f"  {label[v]:<40} flagged {not r.usable!s:<5} residual {r.residual_mm:.2f} mm, "
                f"slice step {r.slice_step_mm:.2f} mm {r.reasons}"
            )


def _fmt(value: float, percent: bool = False) -> str:
    return f"{100 * value:+.0f} %" if percent else f"{value:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--noise", type=float, default=6.0, help="HU per voxel and frame")
    parser.add_argument("--json", type=Path, help="also write every study's numbers here")
    parser.add_argument("--timing", action="store_true", help="only time a 512 x 512 x 16 x 61 s study")
    parser.add_argument(
        "--given-brain-mask", action="store_true", help="give every analysis the true brain mask (skull stripped)"
    )
    parser.add_argument("--interpolation", default="linear", choices=("linear", "bspline"))
    parser.add_argument("--sensitivity", action="store_true", help="only: detection against the size of the corruption")
    args = parser.parse_args()
    BRAIN_MASK["given"] = args.given_brain_mask
    MOTION["settings"] = MotionSettings(interpolation=args.interpolation)
    if args.sensitivity:
        sensitivity([int(s) for s in args.seeds.split(",") if s], args.noise)
        return
    if args.timing:
        timing(args.noise)
        return
    seeds = [int(s) for s in args.seeds.split(",") if s]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    rows = []
    for seed in seeds:
        row = run_study(seed, args.noise)
        rows.append(row)
        print(
            f"seed {seed}: flagged {row['flagged']} corrupted {row['corrupted']} rescuable flagged "
            f"{row['rescuable_flagged']} rescued error mm {row['rescued_error_mm']}"
        )
        print(f"  reasons {row['reasons']}")
        print("  seconds motion " + ", ".join(f"{k} {v:.1f}" for k, v in row["seconds_motion"].items()))
        for name in VARIANTS:
            m = row["maps"][name]
            if "error" in m:
                print(f"  {name:<29} analysis failed: {m['error']}")
                continue
            print(
                f"  {name:<29} core {m['core_ml']:.1f} (true {m['core_true_ml']:.1f}) d {m['core_err_ml']:+.1f} mL, "
                f"Tmax>6 d {m['tmax6_err_ml']:+.1f} mL, CBF gm {_fmt(m['cbf_gm_rel'], True)}, "
                f"CBF wm {_fmt(m['cbf_wm_rel'], True)}, Tmax normal {m['tmax_normal_s']:.2f} s"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    tp = sum(r["true_positive"] for r in rows)
    fp = sum(r["false_positive"] for r in rows)
    fn = sum(r["false_negative"] for r in rows)
    print(f"\nall {len(rows)} studies: precision {tp / max(tp + fp, 1):.2f} ({tp}/{tp + fp}), "
          f"recall {tp / max(tp + fn, 1):.2f} ({tp}/{tp + fn})")  # fmt: skip
    errors = [e for r in rows for e in r["rescued_error_mm"]]
    print(f"rescued moves: {len(errors)}, flagged {sum(len(r['rescuable_flagged']) for r in rows)}, "
          f"registration error median {np.median(errors):.2f} mm, worst {max(errors):.2f} mm")  # fmt: skip
    total = [r["seconds_motion"]["total"] for r in rows]
    print(f"correct_motion seconds: median {np.median(total):.1f}, worst {max(total):.1f}")
    print("\nmean +- std over the analysed studies (worst), error against the true maps:")
    print("| series | analysed | core mL | Tmax > 6 s mL | CBF grey | CBF white | Tmax normal s |")
    print("|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        ok = [r["maps"][name] for r in rows if "error" not in r["maps"][name]]
        cells = [name, f"{len(ok)} of {len(rows)}"]
        for key, percent in KEYS:
            values = np.array([m[key] for m in ok], dtype=float)
            cells.append(_spread(values, percent) if values.size else "-")
        print("| " + " | ".join(cells) + " |")


KEYS = (("core_err_ml", False), ("tmax6_err_ml", False), ("cbf_gm_rel", True), ("cbf_wm_rel", True),
        ("tmax_normal_s", False))  # fmt: skip


def _spread(values: np.ndarray, percent: bool) -> str:
    scale, unit = (100.0, " %") if percent else (1.0, "")
    worst = values[np.argmax(np.abs(values))]
    return f"{scale * values.mean():+.1f}{unit} +- {scale * values.std():.1f} (worst {scale * worst:+.1f})"


if __name__ == "__main__":
    main()
