"""Small studies shared by the pipeline tests: phantom DICOM series (with truth), written once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ctp_node.phantom import PhantomConfig, PhantomStudy, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series import CTPSeries
from ctp_node.series.assemble import assemble_series


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
