"""Shared test fixtures: the read-only material in ../shared beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTP_NODE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def seed_dir() -> Path:
    """../shared/fixtures/seed_checkpoint: required, CI lays it beside the clone."""
    path = SHARED / "fixtures" / "seed_checkpoint"
    if not path.is_dir():
        pytest.fail(f"shared fixtures not found at {path}; set CTP_NODE_SHARED to the shared/ folder")
    return path
