"""Accuracy of `ctp-node perfusion` under realistic noise, on held-out phantom studies, and its speed.

For every study: the maps of the analysis against the true maps, with the numbers of issue 21's
accuracy targets:

- core (rCBF < 30 %) and Tmax > 6 s volumes against the volumes the same conventions give on the
  true maps (``perfusion.lesion.convention_masks``), in mL (target: within 10 mL in every study and
  5 mL on each set's mean);
- the median CBF and CBV in normal white matter, normal grey matter and the core, relative to the
  true medians (target: within 10 %);
- Tmax less the true Tmax (median over the region) in normal white matter (target: 0.5 s) and in the
  penumbra (1 s); ``Tmax n s`` is the median |Tmax - true delay| in normal grey and white matter.

Two columns explain the core CBF error (not targets): ``vox core``, the median over core voxels of
CBF / true CBF less 1 (the estimate's own bias), and ``skew``, the true core CBF's mean / median less
1 (family B's soft-edged cores: +30 to +50 %, where noise alone moves a region median up).

Study sets (6 HU noise per voxel and frame, 1 s sampling, the full series):

- ``issue``: phantom family B (``ctp_node.phantom.family_b``: other anatomy, AIF, residue and noise
  texture than the default phantom) configured like the issue's phantom: 256 x 256 x 8 at 0.9 mm,
  5 mm slices, penumbra delayed 3.5 s, the core 1 s more (nothing delayed more than 5 s), a large
  core (blob radius 24 mm); seeds 20-25 by default (held out until 2026-12-07's fourth stop: the
  low-flow step's guide, ``perfusion.low_flow``, was chosen between two candidates on all four sets);
- ``b``: family B with everything drawn (penumbra delay 2.5-9 s, core size), seeds 0-5;
- ``a``: the default phantom family (192 x 192 x 8 at 1.25 mm, exponential residue, penumbra delays
  4 and 8 s, core 9-12 s), lesion at four positions, seeds 10-15 (the model's training studies use
  other seeds);
- ``abox``: the same with box residues (the other residue of the Kudo 2013 digital phantom), seeds
  10-12;
- ``near``: the issue-shaped configuration with the core's flow at a quarter of normal tissue's (drawn
  0.12-0.2 otherwise): its white-matter core sits just under the rCBF 0.3 threshold (the issue's outside
  phantom had a core of CBF 7), where the per-voxel scatter of CBF, not its bias, sets the core volume;
  seeds 30-35 (added 2026-12-07, fourth stop; no setting chosen on them).

Each row is one study; then per set and target: mean, standard deviation, min..max, and whether
every study meets the target.

    .venv/bin/python benchmarks/perfusion_accuracy.py                      # issue + a, default analysis
    .venv/bin/python benchmarks/perfusion_accuracy.py --sets issue,b,a --analyses parametric+tips,bsvd
    .venv/bin/python benchmarks/perfusion_accuracy.py --timing             # + 512 x 512 x 16 x 60 s
    .venv/bin/python benchmarks/perfusion_accuracy.py --sets issue,b,a --every 8   # acquired every 8 s

``--every N`` analyses every N-th frame only (a scan acquired every N s, the node's "acquired" analysis)
and adds issue 21 item 6: each volume is either within 10 mL of the truth or withheld with a reason
(``ctp_node.perfusion.reliability``); a volume reported and off by more is the failure counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np

from ctp_node.evaluation.perfusion_accuracy import accuracy
from ctp_node.perfusion import PerfusionSettings, compute_perfusion
from ctp_node.perfusion.lesion import convention_masks
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.family_b import FamilyBConfig, generate_family_b

COLUMNS = (
    ("core_ml", "core"), ("core_true_ml", "true"), ("tmax6_ml", "Tmax>6"), ("tmax6_true_ml", "true"),
    ("core_err_ml", "d core"), ("tmax6_err_ml", "d Tmax6"), ("cbf_wm_rel", "CBF wm"), ("cbv_wm_rel", "CBV wm"),
    ("cbf_gm_rel", "CBF gm"), ("cbv_gm_rel", "CBV gm"),
    ("cbf_core_rel", "CBF core"), ("cbv_core_rel", "CBV core"), ("tmax_normal_s", "Tmax n s"),
    ("tmax_wm_s", "Tmax wm"), ("tmax_penumbra_s", "Tmax pen"),
    ("cbf_core_voxel_rel", "vox core"), ("cbf_core_truth_skew", "skew"),
    ("reference_cbf", "ref CBF"), ("reference_cbf_true", "true"), ("pvc_scale", "PVC"), ("seconds", "time s"),
    ("core_withheld", "core w/h"), ("tmax6_withheld", "Tmax6 w/h"),
    ("core_noise_ml", "core +-"), ("core_uncertain_ml", "unc mL"), ("cbf_sd_calibration", "sd cal"),
)  # fmt: skip
# Issue 21's targets (column, limit per study, limit on the set's mean or None): volumes within 10 mL
# in every study and 5 mL on the mean; CBF and CBV region medians within 10 %; Tmax within 0.5 s in
# white matter and 1 s in the penumbra.
TARGETS = (
    ("core_err_ml", 10.0, 5.0), ("tmax6_err_ml", 10.0, 5.0),
    ("cbf_wm_rel", 0.1, None), ("cbv_wm_rel", 0.1, None), ("cbf_gm_rel", 0.1, None), ("cbv_gm_rel", 0.1, None),
    ("cbf_core_rel", 0.1, None), ("cbv_core_rel", 0.1, None),
    ("tmax_wm_s", 0.5, None), ("tmax_penumbra_s", 1.0, None),
)  # fmt: skip
ANALYSES = {
    "parametric+tips": ("parametric", PerfusionSettings()),  # the default
    "bsvd": ("bsvd", PerfusionSettings(denoise="none")),  # the default before issue 13
    "osvd": ("osvd", PerfusionSettings(denoise="none")),  # oSVD as the usual tools compute it
    "osvd+tips": ("osvd", PerfusionSettings()),
    "parametric+tips-nopvc": ("parametric", PerfusionSettings(vof_scaling=False)),
    # the default before the study-wide residue shape: each voxel chooses its shape
    "parametric+tips-voxelshape": ("parametric", PerfusionSettings(residue_shape="voxel")),
    "parametric+tips-mtt5": ("parametric", PerfusionSettings(mtt_median_mm=5.0)),
    # the default before Tmax moved along the delay / transit-time ridge with the MTT median
    "parametric+tips-noridge": ("parametric", PerfusionSettings(tmax_along_ridge=False)),
    # the default before low-flow tissue's Tmax came from a wider neighbourhood (``perfusion.low_flow``)
    "parametric+tips-nolowflow": ("parametric", PerfusionSettings(low_flow_tmax_sigma_mm=0.0)),
    # low-flow tissue's CBF too from the wider neighbourhood (``PerfusionSettings.low_flow_cbf``): its fit's
    # flow amplitude, CBV / MTT of its curves, and that CBV completed for the response after the last frame
    "parametric+tips-lowflowfit": ("parametric", PerfusionSettings(low_flow_cbf="fit")),
    "parametric+tips-lowflowwide": ("parametric", PerfusionSettings(low_flow_cbf="wide")),
    "parametric+tips-lowflowwidec": ("parametric", PerfusionSettings(low_flow_cbf="widecomplete")),
    # CBV completed by the share of the response after the last frame (exact without noise)
    "parametric+tips-complete": ("parametric", PerfusionSettings(complete_truncated_area=True)),
    # the rCBF reference and low-flow CBF less what the study's own noise adds to them (``perfusion.uncertainty``)
    "parametric+tips-noisebias": ("parametric", PerfusionSettings(noise_bias_correction=True)),
    # every voxel's values counted, whether or not its region enhances measurably (diagnostic only)
    "parametric+tips-novalidity": ("parametric", PerfusionSettings(validity_masks=False)),
}
DEFAULT_FAMILY_LESIONS = ((40.0, -5.0, 5.0), (-38.0, 5.0, 0.0), (42.0, 12.0, 8.0), (-40.0, -10.0, 5.0))
# Six studies per set, as issue 21 asks (seeds 15 and 25 joined on 2026-12-07, fourth stop).
DEFAULT_SEEDS = {
    "issue": "20,21,22,23,24,25", "b": "0,1,2,3,4,5", "a": "10,11,12,13,14,15", "abox": "10,11,12",
    "near": "30,31,32,33,34,35",
}  # fmt: skip


NEAR_CORE_RATIO = 0.25  # the "near" set's core CBF / normal tissue's: white-matter core just under rCBF 0.3


def issue_config(seed: int, noise_hu: float) -> FamilyBConfig:
    """Family B like the issue's phantom: penumbra delayed 3.5 s, core 4.5 s, large core."""
    return FamilyBConfig(
        seed=seed, noise_hu=noise_hu, penumbra_delay_override_s=3.5, core_extra_delay_override_s=1.0,
        core_radius_override_mm=24.0,
    )  # fmt: skip


def studies(name: str, seeds: list[int], noise_hu: float):
    for i, seed in enumerate(seeds):
        if name == "issue":
            yield seed, generate_family_b(issue_config(seed, noise_hu))
        elif name == "b":
            yield seed, generate_family_b(FamilyBConfig(seed=seed, noise_hu=noise_hu))
        elif name == "near":
            config = replace(issue_config(seed, noise_hu), core_cbf_ratio_override=NEAR_CORE_RATIO)
            yield seed, generate_family_b(config)
        elif name in ("a", "abox"):
            centre = DEFAULT_FAMILY_LESIONS[i % len(DEFAULT_FAMILY_LESIONS)]
            residue = "box" if name == "abox" else "exponential"
            cfg = PhantomConfig(
                matrix=192, slices=8, noise_hu=noise_hu, seed=seed, lesion_centre_mm=centre, residue=residue
            )
            yield seed, generate_phantom(cfg)
        else:
            raise SystemExit(f"unknown study set {name!r}: use issue, b, a, abox or near")


def evaluate(study, method: str, settings: PerfusionSettings, every: int = 1) -> dict[str, float]:
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    truth = study.truth
    truth_masks = convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml)
    settings = PerfusionSettings(**{**settings.__dict__, "pixel_mm": float(study.spacing_mm[2])})
    start = time.perf_counter()
    hu, times = study.hu[::every], study.times_s[::every]
    maps = compute_perfusion(hu, times, voxel_ml, method=method, settings=settings)
    row = accuracy(maps, study, truth_masks)
    row["seconds"] = time.perf_counter() - start
    row["core_err_ml"] = row["core_ml"] - row["core_true_ml"]
    row["tmax6_err_ml"] = row["tmax6_ml"] - row["tmax6_true_ml"]
    row["pvc_scale"] = maps.vof_scale
    row["core_withheld"] = float("core" in maps.withheld)
    row["tmax6_withheld"] = float("tmax6" in maps.withheld)
    # The core's range under the study's own noise (``perfusion.uncertainty``): its half width, the core counted
    # apart as within its voxels' noise of the threshold, and the per-voxel spread's calibration against the
    # truth (median |CBF error| / sd over the evaluated voxels, / 0.674: 1 when the spread is the error's; bias
    # makes it larger).
    noise = maps.volume_checks["core"].noise
    row["core_noise_ml"] = float("nan") if noise is None else noise.half_width_ml
    row["core_uncertain_ml"] = float("nan") if noise is None else noise.uncertain_ml
    row["cbf_sd_calibration"] = float("nan")
    if maps.cbf_sd is not None and maps.cbf_sd_evaluated is not None and maps.cbf_sd_evaluated.any():
        evaluated = maps.cbf_sd_evaluated & (maps.cbf_sd > 0)
        ratio = np.abs(maps.cbf - truth.cbf)[evaluated] / maps.cbf_sd[evaluated]
        row["cbf_sd_calibration"] = float(np.median(ratio) / 0.6745)
    return row


def sparse_lines(label: str, items: list[dict[str, float]], limit_ml: float = 10.0) -> list[str]:
    """Issue 21 item 6: per volume, studies within ``limit_ml`` of the truth, withheld, and reported wrong."""
    lines = [f"{label}: within {limit_ml:g} mL or withheld (issue 21 item 6)"]
    for volume, error in (("core", "core_err_ml"), ("tmax6", "tmax6_err_ml")):
        withheld = [r for r in items if r[f"{volume}_withheld"]]
        reported = [r for r in items if not r[f"{volume}_withheld"]]
        wrong = [r for r in reported if abs(r[error]) > limit_ml]
        worst = max((abs(r[error]) for r in reported), default=0.0)
        lines.append(
            f"  {volume:<6} reported and within: {len(reported) - len(wrong)}, withheld: {len(withheld)}, "
            f"reported and off by more: {len(wrong)} (worst reported error {worst:.1f} mL) of {len(items)}"
        )
    return lines


def _line(label: str, values: list[str]) -> str:
    return f"{label:<30}" + "".join(f"{v:>9}" for v in values)


def summarise(label: str, items: list[dict[str, float]]) -> list[str]:
    """Mean, sd, min..max and met/not met per target."""
    lines = [f"{label} (n = {len(items)})"]
    for column, limit, mean_limit in TARGETS:
        values = np.array([r[column] for r in items])
        values = values[np.isfinite(values)]  # e.g. no penumbra in the study
        if values.size == 0:
            lines.append(f"  {column:<15} no study has this region")
            continue
        scale, unit = (100.0, " %") if column.endswith("_rel") else (1.0, "")
        within = int(np.sum(np.abs(values) <= limit))
        met = within == values.size and (mean_limit is None or abs(values.mean()) <= mean_limit)
        target = f"{limit * scale:g}{unit}" + ("" if mean_limit is None else f", mean {mean_limit:g}")
        lines.append(
            f"  {column:<15} mean {values.mean() * scale:+7.1f}{unit}  sd {values.std() * scale:5.1f}  "
            f"min..max {values.min() * scale:+6.1f}..{values.max() * scale:+6.1f}{unit}  "
            f"target {target}: {'met' if met else 'NOT met'} ({within}/{values.size})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="issue,a", help="study sets: issue, b, a, abox, near")
    for name, seeds in DEFAULT_SEEDS.items():
        parser.add_argument(f"--{name}-seeds", default=seeds)
    parser.add_argument("--noise", type=float, default=6.0, help="HU per voxel and frame")
    parser.add_argument("--analyses", default="parametric+tips", help=f"of {', '.join(ANALYSES)}")
    parser.add_argument("--timing", action="store_true", help="also time a 512 x 512 x 16 x 60 s study")
    parser.add_argument("--every", type=int, default=1, help="analyse every N-th frame (acquired every N s)")
    args = parser.parse_args()
    names = [a for a in args.analyses.split(",") if a]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"noise {args.noise:g} HU, acquired every {args.every} s")
    print(_line("set seed / analysis", [c[1] for c in COLUMNS]))
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for set_name in [s for s in args.sets.split(",") if s]:
        seeds = [int(s) for s in getattr(args, f"{set_name}_seeds").split(",") if s]
        for seed, study in studies(set_name, seeds, args.noise):
            for name in names:
                method, settings = ANALYSES[name]
                row = evaluate(study, method, settings, args.every)
                rows.setdefault((set_name, name), []).append(row)
                print(_line(f"{set_name} {seed} {name}", [f"{row[c]:.2f}" for c, _ in COLUMNS]), flush=True)
    print()
    for (set_name, name), items in rows.items():
        print("\n".join(summarise(f"{set_name} / {name}", items)))
        print("\n".join(sparse_lines(f"{set_name} / {name}", items)))
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
