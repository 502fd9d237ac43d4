"""Vessel fit vs linear interpolation: arterial input function (AIF) peak height and time errors, and fit time.

For each phantom seed and sampling onset (the first acquisition 0..step-1 s into the study, so the
samples fall at different phases of the bolus), the study is sampled every 4 s or 8 s, brought to
the model grid and back with ``ctp_node.series.grid.from_model_grid``, once with the vessel fit and once
without (linear), with a stand-in model that interpolates linearly in model space (the AIF lies
above the model's window at its peak, so the model does not decide these numbers). The AIF of the
output is the mean over the phantom's proximal-artery voxels (internal carotid, M1); its peak height
and peak time are compared with those of the 1 s acquisition over the same seconds.

Curves: ``phantom`` (the phantom's own AIF) and two other shapes written into the same arterial
voxels in place of it (noise and baseline kept): ``lagged-normal`` (a Gaussian convolved with an
exponential, plus a logistic recirculation step) and ``two-gamma`` (two gamma variates of different
shape and a broad recirculation), so the fit is not judged on the phantom's own family only.

Fit time: ``vessel_fits`` (candidate search + fit) on a 512 x 512 x 16 phantom acquired every 4 s
(16 volumes), and ``fit_curves`` on 125 000 arterial-like voxels (3 % of such a study): wall clock and
CPU time of the process (the CPU time is what the fit costs when other jobs share the cores).

    .venv/bin/python benchmarks/vessel_fit.py [--seeds 2] [--skip-timing]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.aif import GammaVariate, reference_aif
from ctp_node.phantom.anatomy import PROXIMAL_ARTERY, Lesion, head_labels
from ctp_node.phantom.generator import reference_grid
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series import vessel_fit
from ctp_node.series.grid import from_model_grid, to_model_grid, vessel_fits
from model.planner import plan_seconds


def lagged_normal(t: np.ndarray) -> np.ndarray:
    dt = 0.01
    fine = np.arange(0.0, 120.0, dt)
    gauss = np.exp(-0.5 * ((fine - 15.0) / 2.5) ** 2)
    kernel = np.exp(-fine / 4.0)
    curve = np.convolve(gauss, kernel / kernel.sum())[: fine.size]
    curve = curve / curve.max() * 600.0 + 90.0 / (1.0 + np.exp(-(fine - 27.0) / 3.0))
    return np.interp(t, fine, curve)


def two_gamma(t: np.ndarray) -> np.ndarray:
    return (
        GammaVariate(380.0, 7.0, 3.0, 2.2)(t)
        + GammaVariate(150.0, 14.0, 4.0, 2.0)(t)
        + GammaVariate(60.0, 20.0, 1.5, 12.0)(t)
    )


def proximal_arteries(cfg: PhantomConfig) -> np.ndarray:
    lesion = Lesion(cfg.lesion_centre_mm, cfg.lesion_core_radius_mm, cfg.lesion_penumbra_radius_mm)
    _, kind = head_labels(reference_grid(cfg), lesion if cfg.lesion else None)
    return kind == PROXIMAL_ARTERY


def model_linear_slabs(grid, sources) -> list[np.ndarray]:
    """A stand-in model: linear interpolation of the model-grid volumes (the AIF peak is outside its window)."""
    slabs = []
    for slab in grid.slabs:
        out = np.empty((len(sources), *slab.shape[1:]), dtype=np.float32)
        for g, src in enumerate(sources):
            out[g] = (1 - src.weight) * slab[src.left] + src.weight * slab[src.right]
        slabs.append(out)
    return slabs


def run_case(study, arteries: np.ndarray, step: int, onset: int) -> dict[str, tuple[float, float]]:
    times = ",".join(str(t) for t in range(onset, int(study.times_s[-1]) + 1, step))
    series = sample_study(study, parse_schedule(f"times:{times}"))
    grid = to_model_grid(series)
    plan = plan_seconds(series.times_s, long_gap="linear")
    slabs = model_linear_slabs(grid, plan.fills)
    truth = study.hu[onset + plan.seconds][:, arteries].mean(axis=1)
    errors = {}
    for name, fit in (("linear", False), ("fit", True)):
        back = from_model_grid(grid, slabs, plan, series, fit_vessels=fit)
        aif = back.hu[:, arteries].mean(axis=1)
        errors[name] = (
            abs(float(aif.max() - truth.max())),
            abs(float(back.times_s[np.argmax(aif)] - np.argmax(truth))),
        )
    return errors


def accuracy(seeds: int) -> None:
    curves = {"phantom": None, "lagged-normal": lagged_normal, "two-gamma": two_gamma}
    print("| curve | sampling | cases | peak error HU: linear | fit | peak time error s: linear | fit |")
    print("|---|---|---|---|---|---|---|")
    studies = []
    for seed in range(seeds):
        cfg = PhantomConfig(matrix=128, slices=8, duration_s=61, noise_hu=5.0, seed=100 + seed)
        studies.append((generate_phantom(cfg), proximal_arteries(cfg)))
    for name, fn in curves.items():
        for step in (4, 8):
            rows = []
            for study, arteries in studies:
                hu = study.hu
                if fn is not None:
                    hu = study.hu.copy()
                    hu[:, arteries] += (fn(study.times_s) - study.aif_hu).astype(np.float32)[:, None]
                case = dataclasses.replace(study, hu=hu)
                for onset in range(0, step, 2 if step == 8 else 1):
                    rows.append(run_case(case, arteries, step, onset))
            lin = np.array([r["linear"] for r in rows])
            fit = np.array([r["fit"] for r in rows])
            print(
                f"| {name} | every {step} s | {len(rows)} | {lin[:, 0].mean():.1f} +- {lin[:, 0].std():.1f} | "
                f"{fit[:, 0].mean():.1f} +- {fit[:, 0].std():.1f} | {lin[:, 1].mean():.2f} | {fit[:, 1].mean():.2f} |",
                flush=True,
            )


def timing() -> None:
    cfg = PhantomConfig(matrix=512, slices=16, duration_s=61, noise_hu=10.0, seed=3)
    study = generate_phantom(cfg)
    series = sample_study(study, parse_schedule("every:4"))
    del study
    plan = plan_seconds(series.times_s, long_gap="linear")
    grid = to_model_grid(series)
    noise = vessel_fit.estimate_noise_hu(series.hu[0], series.hu[1])
    n_candidates = int((vessel_fit.enhancement(list(series.hu)) >= vessel_fit.enhancement_threshold(noise)).sum())
    started, cpu = time.perf_counter(), time.process_time()
    fitted = vessel_fits(series.hu, series.times_s, plan, grid.brain_mask)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    n_fit = 0 if fitted is None else fitted[0].size
    print(
        f"512 x 512 x 16 x {series.hu.shape[0]} frames (noise {noise:.1f} HU): candidate search + fit {elapsed:.2f} s "
        f"wall ({cpu:.2f} s CPU), {n_candidates} candidate voxels (before removing those the model fills), "
        f"{n_fit} fits accepted"
    )
    # The worst case the brief names: 3 % of 512 x 512 x 16 voxels carry contrast.
    rng = np.random.default_rng(0)
    times = np.arange(0.0, 61.0, 4.0)
    n_vox = 125_000
    shift = rng.uniform(-3.0, 6.0, n_vox)
    scale = rng.uniform(0.2, 1.0, n_vox)
    samples = (
        40.0 + scale[None] * reference_aif(times[:, None] + shift[None]) + rng.normal(0, 10.0, (times.size, n_vox))
    )
    started, cpu = time.perf_counter(), time.process_time()
    fit = vessel_fit.fit_curves(times, samples.astype(np.float32), 10.0)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    accepted = fit.accepted.mean()
    print(f"fit_curves, {n_vox} voxels x 16 frames: {elapsed:.2f} s wall ({cpu:.2f} s CPU), {accepted:.0%} accepted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        accuracy(args.seeds)
    if not args.skip_timing:
        timing()


if __name__ == "__main__":
    main()
