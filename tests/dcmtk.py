"""Finding DCMTK's binaries for tests.

pynetdicom installs Python apps named echoscu, storescu, storescp, ... into the virtualenv's bin/;
with the venv activated they shadow DCMTK's. Tests that mean DCMTK (a real, independent peer)
look its binaries up here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def dcmtk(tool: str) -> str | None:
    """The first executable named ``tool`` on PATH that is not a Python script."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with open(candidate, "rb") as fh:
                if fh.read(2) != b"#!":
                    return str(candidate)
    return None


def require(tool: str) -> str:
    """The DCMTK binary, or skip (CI installs DCMTK, so a skip there means .ci/run is broken)."""
    path = dcmtk(tool)
    if path is None:
        pytest.skip(f"{tool} (DCMTK) is not installed; .ci/run installs it")
    return path
