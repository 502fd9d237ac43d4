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


# Beside the modules that mark themselves (`pytestmark = pytest.mark.slow`: integration peers, fuzzing,
# phantom evaluation), the slow tests named in one place: whole training runs, the network end to end,
# the phantom's perfusion evaluation, and every test that drives a headless browser. `pytest -m "not slow"`
# is a developer's fast lane (README, Tests); CI runs everything.
SLOW_MODULES = frozenset(
    {
        "tests/training/test_cli.py",
        "tests/training/test_distributed.py",
        "tests/training/test_demo_weights.py",
        "tests/perfusion/test_phantom.py",
        "tests/cli/test_demo.py",
        "tests/series/test_demo_output_pinned.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        if module in SLOW_MODULES or "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
