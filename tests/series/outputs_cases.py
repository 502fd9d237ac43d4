"""Shared by the perfusion output tests: known analyses, the writers' input, reference images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series.guardrail import CheckResult, GuardrailVerdict
from ctp_node.series.outputs import AnalysisKind, PerfusionAnalysis, PerfusionOutputInput, TissueCurves

SOURCE_UID = "1.2.826.0.1.3680043.8.498.77"
SHAPE = (3, 48, 48)
VOXEL_ML = 0.125


def disc(radius: float, z: int, centre=(24, 30)) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[z] = np.hypot(yy - centre[0], xx - centre[1]) < radius
    return mask


def make_analysis(kind: AnalysisKind = AnalysisKind.SYNTHETIC, **changes) -> PerfusionAnalysis:
    """Maps with known values: a gradient over the brain, a lesion of three nested discs in slice 1."""
    rng = np.random.default_rng(1)
    brain = np.zeros(SHAPE, dtype=bool)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    brain[:] = np.hypot(yy - 24, xx - 24) < 20
    cbf = np.where(brain, rng.uniform(5, 75, SHAPE), 0).astype(np.float32)
    cbv = np.where(brain, rng.uniform(0.5, 5.5, SHAPE), 0).astype(np.float32)
    mtt = np.where(brain, rng.uniform(2, 14, SHAPE), 0).astype(np.float32)
    tmax = np.where(brain, rng.uniform(0, 12, SHAPE), 0).astype(np.float32)
    core, tmax6, tmax10 = disc(4, 1), disc(9, 1), disc(6, 1)
    times = np.arange(20.0)
    aif = 400 * np.exp(-0.5 * ((times - 8) / 2) ** 2)
    volumes = {name: float(mask.sum()) * VOXEL_ML for name, mask in (("c", core), ("h", tmax6), ("s", tmax10))}
    fields = dict(
        kind=kind, cbf=cbf, cbv=cbv, mtt=mtt, tmax=tmax, core_mask=core, tmax6_mask=tmax6, tmax10_mask=tmax10,
        times_s=times, aif_curve=aif, aif_voxels=np.array([[0, 10, 12], [0, 11, 12], [1, 10, 36]]),
        vof_curve=0.6 * np.roll(aif, 5), vof_voxels=np.array([[2, 40, 24]]), brain_mask=brain,
        core_volume_ml=volumes["c"], tmax6_volume_ml=volumes["h"], tmax10_volume_ml=volumes["s"],
        mismatch_volume_ml=volumes["h"] - volumes["c"], mismatch_ratio=volumes["h"] / volumes["c"],
        hypoperfusion_intensity_ratio=volumes["s"] / volumes["h"], reference_cbf=45.0, method="test",
    )  # fmt: skip
    fields.update(changes)
    return PerfusionAnalysis(**fields)


def make_input(reference_files, **changes) -> PerfusionOutputInput:
    times = np.arange(20.0)
    curves = TissueCurves(times, {"normal": 30 + 5 * np.exp(-0.5 * ((times - 10) / 3) ** 2)})
    verdict = GuardrailVerdict(
        policy="flag", passed=True, action="none", checks=[CheckResult("class offset grey", 0.2, 1.0, True, 900)]
    )
    fields = dict(
        synthetic=make_analysis(), reference_files=reference_files, source_series_uid=SOURCE_UID,
        acquired=make_analysis(AnalysisKind.ACQUIRED, times_s=times[::4], aif_curve=times[::4] * 0 + 1.0,
                               vof_curve=None, vof_voxels=None),
        synthetic_curves=curves, acquired_curves=TissueCurves(times[::4], {"normal": curves.curves["normal"][::4]}),
        guardrail=verdict,
    )  # fmt: skip
    fields.update(changes)
    return PerfusionOutputInput(**fields)


def write_reference_files(folder: Path) -> list[Path]:
    """Three single-frame CT images of one second on the maps' grid (as the derived series' first second)."""
    study = generate_phantom(PhantomConfig(matrix=SHAPE[1], slices=SHAPE[0], duration_s=2, seed=5))
    series = sample_study(study, parse_schedule("every:1"))
    first = dataclasses.replace(series, hu=series.hu[:1], times_s=series.times_s[:1])
    return write_study(first, folder, uid_seed="outputs-tests")
