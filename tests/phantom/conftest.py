"""Small phantom studies shared by the phantom tests (generated once per session: a few seconds)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ctp_node.phantom import PhantomConfig, PhantomStudy, generate_phantom

SMALL = PhantomConfig(matrix=64, slices=3, duration_s=16, noise_hu=4.0, seed=3)


@pytest.fixture(scope="session")
def small_study() -> PhantomStudy:
    """64 x 64 x 3 slices x 16 s with noise and lesion: fast enough for every writer combination."""
    return generate_phantom(SMALL)


@pytest.fixture(scope="session")
def clean_study() -> PhantomStudy:
    """96 x 96 x 4 slices x 40 s, no noise, class values without variation: for curve checks."""
    return generate_phantom(
        PhantomConfig(
            matrix=96,
            slices=4,
            duration_s=40,
            noise_hu=0.0,
            perfusion_variation=0.0,
            delay_variation_s=0.0,
            baseline_variation_hu=0.0,
        )
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that are errors (warnings are returned by ``dciodvfy_report``)."""
    return [line for line in dciodvfy_report(path) if line.startswith("Error")]


def dciodvfy_report(path: Path) -> list[str]:
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; CI installs it")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
