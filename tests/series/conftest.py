"""Small studies shared by the pipeline tests: phantom DICOM series (with truth) and analytic ring heads."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ctp_node.phantom import PhantomConfig, PhantomStudy, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import SCAN_START, parse_schedule, sample_study
from ctp_node.series import CTPSeries
from ctp_node.series.assemble import assemble_series

DCIODVFY = "/usr/bin/dciodvfy"


@dataclass
class DicomCase:
    """A phantom study, the series a scanner acquired from it (every 4 s), its files, and it read back."""

    study: PhantomStudy
    files: list[Path]
    series: CTPSeries


def _dicom_case(folder: Path, cfg: PhantomConfig, **write_options) -> DicomCase:
    study = generate_phantom(cfg)
    acquired = sample_study(study, parse_schedule("every:4"))
    seed = f"pipeline-tests-{cfg.matrix}x{cfg.slices}"  # distinct UIDs per case
    files = write_study(acquired, folder, uid_seed=seed, **write_options)
    return DicomCase(study, files, assemble_series(files))


@pytest.fixture(scope="session")
def head16(tmp_path_factory) -> DicomCase:
    """128 x 128 x 16 slices of 5 mm, 13 s sampled at 0, 4, 8, 12 s, with noise: 64 GE-like files."""
    cfg = PhantomConfig(matrix=128, slices=16, duration_s=13, noise_hu=5.0, seed=2)
    return _dicom_case(tmp_path_factory.mktemp("head16"), cfg)


@pytest.fixture(scope="session")
def small_head(tmp_path_factory) -> DicomCase:
    """64 x 64 x 3 slices, 9 s sampled at 0, 4, 8 s, Siemens-like (unsigned 12-bit): 9 files."""
    cfg = PhantomConfig(matrix=64, slices=3, duration_s=9, noise_hu=5.0, seed=4)
    return _dicom_case(tmp_path_factory.mktemp("small"), cfg, vendor="siemens")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path`` (warnings ignored); skips when dicom3tools is absent."""
    if not Path(DCIODVFY).is_file() and shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; CI installs it")
    binary = DCIODVFY if Path(DCIODVFY).is_file() else shutil.which("dciodvfy")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


BRAIN_HU, VESSEL_HU, DARK_HU, BONE_HU, SCALP_HU, AIR_HU = 30.0, 150.0, -20.0, 1000.0, 40.0, -1000.0


def ring_head(
    shape_zyx: tuple[int, int, int] = (8, 160, 160),
    spacing_zyx: tuple[float, float, float] = (5.0, 1.25, 1.25),
    times_s: tuple[float, ...] = (0.0, 4.0),
    brain_radius_mm: float = 70.0,
    centre_mm: tuple[float, float] = (0.0, 0.0),
) -> CTPSeries:
    """An analytic axial head: a cylinder of brain (30 HU + 2 HU per second) inside a 6 mm skull ring
    (1000 HU) and 4 mm of scalp, in air; inside the brain a 'vessel' block at 150 HU and a dark block at
    -20 HU (both outside the 0..80 window), 20 mm wide, centred 30 mm right and left of the centre."""
    n_z, n_y, n_x = shape_zyx
    dz, dy, dx = spacing_zyx
    origin = (-(n_x - 1) * dx / 2, -(n_y - 1) * dy / 2, 0.0)
    x = origin[0] + np.arange(n_x) * dx - centre_mm[0]
    y = origin[1] + np.arange(n_y) * dy - centre_mm[1]
    r = np.hypot(x[None, :], y[:, None])
    image = np.full((n_y, n_x), AIR_HU, dtype=np.float32)
    image[r < brain_radius_mm + 10] = SCALP_HU
    image[r < brain_radius_mm + 6] = BONE_HU
    image[r < brain_radius_mm] = BRAIN_HU
    near = np.abs(y[:, None]) < 10
    image[near & (np.abs(x[None, :] - 30) < 10)] = VESSEL_HU
    image[near & (np.abs(x[None, :] + 30) < 10)] = DARK_HU
    volume = np.broadcast_to(image, (n_z, n_y, n_x))
    brain = (volume == BRAIN_HU).astype(np.float32)
    hu = np.stack([volume + np.float32(2.0 * t) * brain for t in times_s]).astype(np.float32)
    return CTPSeries(
        hu=hu,
        times_s=np.asarray(times_s, dtype=np.float64),
        origin=origin,
        spacing_mm=spacing_zyx,
        direction=np.eye(3),
        start=SCAN_START,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
