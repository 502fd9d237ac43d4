"""Array outputs of the phantom: the published model's array layout, truth maps and a sidecar.

Model layout: one float32 array (8, 192, 192, T) (slice, row, column, time), HU windowed to
0..80 (``clip(hu, 0, 80)``) and skull-stripped (0 outside the brain mask), as the published model
was trained on. The JSON sidecar (``<stem>.json``) holds ``times_s`` and ``spacing_mm`` (z, y, x)
as ``ctp-node perfusion`` expects; ``truth.npz`` holds the ground truth maps.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctp_node.phantom.generator import PhantomStudy
from ctp_node.phantom.sampling import SCAN_START
from ctp_node.phantom.tissue import TissueLabel
from ctp_node.series import CTPSeries

if TYPE_CHECKING:  # the type only: model's package would load torch
    from model.progress import ProgressFn

MODEL_SHAPE = (8, 192, 192)
MODEL_WINDOW_HU = (0.0, 80.0)


def model_layout(series: CTPSeries, brain_mask: np.ndarray) -> np.ndarray:
    """(8, 192, 192, T) float32 in 0..80 HU, 0 outside ``brain_mask``; ValueError for other grids."""
    if series.hu.shape[1:] != MODEL_SHAPE:
        raise ValueError(
            f"the model layout needs 8 slices of 192 x 192, got {series.hu.shape[1:]}: "
            "generate with matrix=192 and slices=8 (CLI: --matrix 192 --slices 8)"
        )
    windowed = np.clip(series.hu, *MODEL_WINDOW_HU) * brain_mask[None]
    return np.ascontiguousarray(np.moveaxis(windowed, 0, -1), dtype=np.float32)


def write_truth(study: PhantomStudy, path: Path) -> Path:
    """Ground truth maps and the 1 s AIF as a compressed .npz (arrays named as in PerfusionTruth)."""
    truth = study.truth
    np.savez_compressed(
        path,
        cbf=truth.cbf,
        cbv=truth.cbv,
        mtt=truth.mtt,
        tmax=truth.tmax,
        delay=truth.delay,
        labels=truth.labels,
        core_mask=truth.core_mask,
        penumbra_mask=truth.penumbra_mask,
        brain_mask=truth.brain_mask,
        aif_hu=study.aif_hu,
        aif_times_s=study.times_s,
    )
    return path


def sidecar(study: PhantomStudy, series: CTPSeries, **extra: object) -> dict:
    """Everything needed to interpret the outputs: times, geometry, configuration, label names."""
    config = asdict(study.config)
    return {
        "times_s": [round(float(t), 6) for t in series.times_s],
        "first_acquisition_s": round((series.start - SCAN_START).total_seconds(), 6) if series.start else 0.0,
        "spacing_mm": list(series.spacing_mm),
        "origin_mm": list(series.origin),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "labels": {label.name.lower(): int(label) for label in TissueLabel},
        "truth": "truth.npz",
        "motion": [asdict(m) for m in study.motion],
        **extra,
    }


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_outputs(
    study: PhantomStudy,
    series: CTPSeries,
    output: Path,
    *,
    layout: str,
    vendor: str = "ge",
    transfer_syntax: str = "explicit",
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Write ``truth.npz``, ``phantom.json`` and the study: ``dicom/*.dcm`` or ``phantom.npy`` (layout "npy").

    Returns the DICOM files (empty for "npy"). UIDs derive from the configuration's seed.
    """
    from ctp_node.phantom.dicom_study import write_study

    output.mkdir(parents=True, exist_ok=True)
    if layout == "npy":
        array = model_layout(series, study.truth.brain_mask)  # validates the grid before writing anything
        np.save(output / "phantom.npy", array)
        paths: list[Path] = []
        extra = {"layout": "npy", "axes": "z,y,x,t", "window_hu": list(MODEL_WINDOW_HU)}
    else:
        paths = write_study(
            series,
            output / "dicom",
            layout=layout,
            vendor=vendor,
            transfer_syntax=transfer_syntax,
            uid_seed=f"ctp-phantom-{study.config.seed}",
            progress=progress,
        )
        extra = {"layout": layout, "vendor": vendor, "transfer_syntax": transfer_syntax, "dicom": "dicom"}
    write_truth(study, output / "truth.npz")
    write_json(sidecar(study, series, **extra), output / "phantom.json")
    return paths
