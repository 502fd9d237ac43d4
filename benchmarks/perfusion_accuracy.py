"""Accuracy of `ctp-node perfusion` under realistic noise, on held-out phantom studies, and its speed.

For every study: the maps of the analysis against the true maps, with the numbers of the accuracy
targets (issue 13, item 0):

- core (rCBF < 30 %) and Tmax > 6 s volumes against the volumes the same conventions give on the
  true maps (``perfusion.lesion.convention_masks``), in mL;
- the median CBF and CBV in normal white matter and in the core, relative to the true medians;
- the median |Tmax - true delay| in normally perfused grey and white matter, in s.

Studies: phantom family B (``ctp_node.phantom.family_b``: other anatomy, AIF, residue and noise
texture than the default phantom; nothing of the analysis was fitted to it) and the default phantom
family, each with 6 HU noise. Several analyses can be compared (``--analyses``); each row is one
study, then mean +- std per analysis.

    .venv/bin/python benchmarks/perfusion_accuracy.py                       # 6 + 3 studies
    .venv/bin/python benchmarks/perfusion_accuracy.py --timing              # + 512 x 512 x 16 x 60 s
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.perfusion.compare import accuracy
from ctp_node.perfusion.lesion import convention_masks
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.family_b import FamilyBConfig, generate_family_b

COLUMNS = (
    ("core_ml", "core"), ("core_true_ml", "true"), ("tmax6_ml", "Tmax>6"), ("tmax6_true_ml", "true"),
    ("core_err_ml", "d core"), ("tmax6_err_ml", "d Tmax6"), ("cbf_wm_rel", "CBF wm"), ("cbv_wm_rel", "CBV wm"),
    ("cbf_core_rel", "CBF core"), ("cbv_core_rel", "CBV core"), ("tmax_normal_s", "Tmax n s"), ("seconds", "time s"),
)  # fmt: skip
ANALYSES = {
    "parametric+tips": ("parametric", PerfusionSettings()),  # the default
    "bsvd": ("bsvd", PerfusionSettings(denoise="none")),  # the former default
    "osvd+tips": ("osvd", PerfusionSettings()),
}
DEFAULT_FAMILY_LESIONS = ((40.0, -5.0, 5.0), (-38.0, 5.0, 0.0), (42.0, 12.0, 8.0), (-40.0, -10.0, 5.0))


def studies(family_b_seeds: list[int], default_seeds: list[int], noise_hu: float):
    for seed in family_b_seeds:
        yield f"B seed {seed}", generate_family_b(FamilyBConfig(seed=seed, noise_hu=noise_hu))
    for i, seed in enumerate(default_seeds):
        centre = DEFAULT_FAMILY_LESIONS[i % len(DEFAULT_FAMILY_LESIONS)]
        cfg = PhantomConfig(matrix=192, slices=8, noise_hu=noise_hu, seed=seed, lesion_centre_mm=centre)
        yield f"default seed {seed}", generate_phantom(cfg)


def evaluate(study, method: str, settings: PerfusionSettings) -> dict[str, float]:
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    truth = study.truth
    truth_masks = convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml)
    settings = PerfusionSettings(**{**settings.__dict__, "pixel_mm": float(study.spacing_mm[2])})
    start = time.perf_counter()
    maps = compute_perfusion(study.hu, study.times_s, voxel_ml, method=method, settings=settings)
    row = accuracy(maps, study, truth_masks)
    row["seconds"] = time.perf_counter() - start
    row["core_err_ml"] = row["core_ml"] - row["core_true_ml"]
    row["tmax6_err_ml"] = row["tmax6_ml"] - row["tmax6_true_ml"]
    return row


def _line(label: str, values: list[str]) -> str:
    return f"{label:<34}" + "".join(f"{v:>10}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family-b-seeds", default="0,1,2,3,4,5")
    parser.add_argument("--default-seeds", default="0,1,2")
    parser.add_argument("--noise", type=float, default=6.0, help="HU per voxel and frame")
    parser.add_argument("--analyses", default="parametric+tips,bsvd", help=f"of {', '.join(ANALYSES)}")
    parser.add_argument("--timing", action="store_true", help="also time a 512 x 512 x 16 x 60 s study")
    args = parser.parse_args()
    seeds_b = [int(s) for s in args.family_b_seeds.split(",") if s]
    seeds_d = [int(s) for s in args.default_seeds.split(",") if s]
    names = [a for a in args.analyses.split(",") if a]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(_line("study / analysis", [c[1] for c in COLUMNS]))
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for label, study in studies(seeds_b, seeds_d, args.noise):
        family = label.split(" seed")[0]
        for name in names:
            method, settings = ANALYSES[name]
            row = evaluate(study, method, settings)
            rows.setdefault((family, name), []).append(row)
            print(_line(f"{label} {name}", [f"{row[c]:.2f}" for c, _ in COLUMNS]), flush=True)
    print()
    for (family, name), items in rows.items():
        mean = [f"{np.mean([r[c] for r in items]):.2f}" for c, _ in COLUMNS]
        std = [f"{np.std([r[c] for r in items]):.2f}" for c, _ in COLUMNS]
        print(_line(f"{family} {name} mean (n={len(items)})", mean))
        print(_line(f"{family} {name} std", std))
        worst_volume = max(max(abs(r["core_err_ml"]), abs(r["tmax6_err_ml"])) for r in items)
        worst_rel = max(abs(r[c]) for r in items for c in ("cbf_wm_rel", "cbv_wm_rel", "cbf_core_rel", "cbv_core_rel"))
        worst_tmax = max(r["tmax_normal_s"] for r in items)
        print(
            f"  worst: volume error {worst_volume:.1f} mL (target 10), region median {worst_rel:.0%} "
            f"(target 20 %), Tmax normal {worst_tmax:.2f} s (target 1 s)"
        )
    if args.timing:
        cfg = PhantomConfig(matrix=512, slices=16, duration_s=60, noise_hu=10.0, seed=0)
        study = generate_phantom(cfg)
        voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
        settings = PerfusionSettings(pixel_mm=cfg.pixel_mm)
        start = time.perf_counter()
        compute_perfusion(study.hu, study.times_s, voxel_ml, settings=settings)
        print(f"\n512 x 512 x 16 x 60 s (default analysis): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
