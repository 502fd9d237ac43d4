"""Static series of real CT anatomy: nothing changes, so every synthetic second must equal the acquired.

The phantom cannot show whether the model keeps real anatomy's grey levels (texture, noise and
partial volume of a real scanner). A static series can: the same real CT volume acquired three
times, at 0, g and 2g s; the synthetic seconds in between should be the acquired volume. Measured
over the voxels the model may change (the node's brain mask, HU within the model's 0..80 window):
mean and mean absolute difference of the synthetic seconds vs the acquired volume (issue 10's
targets: within 0.5 HU in the mean, 2 HU mean absolute).

Real CT available offline: pydicom's test files. Two are real axial head CT slices with the skull:
``J2K_pixelrep_mismatch.dcm`` (512 x 512, 0.431 mm pixels, 5 mm, posterior fossa level: temporal
lobes, cerebellum; lossless) and ``693_J2KI.dcm`` (512 x 512, 0.479 mm, 5 mm, supratentorial level;
irreversible JPEG 2000, so its brain is blocky). ``CT_small.dcm`` is a 128 x 128 neck slice with no
skull ring to strip. A single slice is replicated to the network's 8-slice slab (a volume without
through-plane change: the node's path then runs as on any 8-slice 5 mm series); its gantry tilt is
dropped (axial geometry), which for a replicated slice moves nothing. A folder of one series'
slices is used as acquired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctp_node.evaluation.metrics import difference_stats
from ctp_node.evaluation.node_path import grid_linear, node_inpaint
from ctp_node.evaluation.report import StaticRow
from ctp_node.series import CTPSeries
from ctp_node.series.grid import SLAB_SLICES
from model.engine import StudyInpainter
from model.window import WINDOW_HIGH_HU, WINDOW_LOW_HU

PYDICOM_HEAD_CTS = ("J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")
STATIC_VOLUMES = 3


@dataclass
class StaticSource:
    name: str
    hu: np.ndarray  # float32 (Z, Y, X)
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    notes: str


def offline_head_cts() -> list[Path]:
    """pydicom's real head CT slices, from the installed package (never downloaded)."""
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(name, download=False) for name in PYDICOM_HEAD_CTS]
    found = [Path(p) for p in paths if p is not None]
    if not found:
        raise FileNotFoundError(f"none of pydicom's head CT test files {PYDICOM_HEAD_CTS} is installed")
    return found


def _hu(ds) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    return pixels * np.float32(ds.get("RescaleSlope", 1.0)) + np.float32(ds.get("RescaleIntercept", 0.0))


def load_static_source(path: Path) -> StaticSource:
    """A real CT volume from one DICOM slice (replicated to 8 slices) or a folder of one series' slices."""
    import pydicom

    if path.is_dir():
        datasets = [pydicom.dcmread(f) for f in sorted(path.iterdir()) if f.is_file()]
        datasets = [d for d in datasets if d.get("Modality") == "CT" and "PixelData" in d]
        if not datasets:
            raise ValueError(f"{path} holds no CT image")
        series = datasets[0].SeriesInstanceUID
        datasets = [d for d in datasets if d.SeriesInstanceUID == series]
        normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
        datasets.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
        positions = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))) for d in datasets]
        dz = float(np.median(np.diff(positions))) if len(datasets) > 1 else float(datasets[0].SliceThickness)
        dy, dx = (float(v) for v in datasets[0].PixelSpacing)
        hu = np.stack([_hu(d) for d in datasets])
        return StaticSource(path.name, hu, (dz, dy, dx), f"{path.name}: {len(datasets)} slices of one series")
    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "CT":
        raise ValueError(f"{path} is not a CT image (Modality {ds.get('Modality')!r})")
    slice_hu = _hu(ds)
    if slice_hu.ndim != 2:
        raise ValueError(f"{path} holds {slice_hu.shape[0]} frames; give one slice or a folder of slices")
    dy, dx = (float(v) for v in ds.PixelSpacing)
    dz = float(ds.get("SliceThickness", 5.0) or 5.0)
    hu = np.repeat(slice_hu[None], SLAB_SLICES, axis=0)
    notes = (
        f"{path.name}: one real CT slice ({slice_hu.shape[1]} x {slice_hu.shape[0]}, {dx:.3f} mm pixels, "
        f"{dz:g} mm) replicated to {SLAB_SLICES} slices, axial geometry"
    )
    return StaticSource(path.name, hu, (dz, dy, dx), notes)


def static_series(source: StaticSource, gap_s: int, volumes: int = STATIC_VOLUMES) -> CTPSeries:
    """``volumes`` identical copies of the source acquired every ``gap_s`` s."""
    hu = np.repeat(source.hu[None].astype(np.float32), volumes, axis=0)
    return CTPSeries(
        hu=hu, times_s=np.arange(volumes, dtype=np.float64) * gap_s, origin=(0.0, 0.0, 0.0),
        spacing_mm=source.spacing_mm, direction=np.eye(3),
    )  # fmt: skip


def evaluate_static(engine: StudyInpainter, source: StaticSource, gap_s: int) -> StaticRow:
    """Synthetic seconds of the static series vs the acquired volume (module docstring)."""
    started = time.perf_counter()
    series = static_series(source, gap_s)
    node = node_inpaint(engine, series)
    acquired = source.hu
    region = node.brain_mask & (acquired >= WINDOW_LOW_HU) & (acquired <= WINDOW_HIGH_HU)
    stats = difference_stats(node.hu, np.broadcast_to(acquired, node.hu.shape), region, node.synthetic)
    floor_out = grid_linear(series)
    floor = difference_stats(floor_out.hu, np.broadcast_to(acquired, node.hu.shape), region, node.synthetic)
    return StaticRow(
        source=source.name,
        gap_s=gap_s,
        mean_diff_hu=stats.mean_hu,
        mean_abs_diff_hu=stats.mean_abs_hu,
        worst_second_mean_hu=stats.worst_frame_mean_hu,
        n_voxels=stats.n_voxels,
        synthetic_seconds=int(node.synthetic.sum()),
        floor_mean_diff_hu=floor.mean_hu,
        floor_mean_abs_diff_hu=floor.mean_abs_hu,
        notes=source.notes,
        seconds=time.perf_counter() - started,
    )
