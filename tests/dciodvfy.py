"""dciodvfy (David Clunie's DICOM validator, Debian package dicom3tools) for tests of written files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEBIAN_PATH = Path("/usr/bin/dciodvfy")


def dciodvfy_report(path: Path) -> list[str]:
    """dciodvfy's non-empty report lines for ``path``; skips the test when dicom3tools is absent."""
    binary = shutil.which("dciodvfy") or (str(DEBIAN_PATH) if DEBIAN_PATH.is_file() else None)
    if binary is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; CI installs it")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False)
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def dciodvfy_errors(path: Path) -> list[str]:
    """The report's error lines (warnings left out)."""
    return [line for line in dciodvfy_report(path) if line.startswith("Error")]
