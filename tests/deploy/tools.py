"""Helpers of the deploy/ checks: paths, and the rule for checks whose tool is not installed.

A check whose tool (PyYAML, jsonschema, the Compose schema, hadolint, lua5.4, systemd-analyze,
Orthanc) is absent is skipped with the install line. With CTP_NODE_DEPLOY_CHECKS=required (set it in
CI once .ci/run installs the tools) an absent tool fails the test instead, so a check can never be
skipped silently where it is meant to run.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
SCHEMA_CACHE = Path(__file__).resolve().parent / ".cache" / "compose-spec.schema.json"


def missing(what: str, install: str):
    """Skip (or fail under CTP_NODE_DEPLOY_CHECKS=required) because ``what`` is not installed."""
    message = f"{what} is not available; install it with: {install}"
    if os.environ.get("CTP_NODE_DEPLOY_CHECKS") == "required":
        pytest.fail(message)
    pytest.skip(message)


def need_module(name: str, install: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", install)


def need_program(name: str, install: str, candidates: tuple[str, ...] = ()) -> str:
    for path in (shutil.which(name), *candidates):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return str(path)
    missing(f"program {name}", install)
    raise AssertionError("unreachable")
