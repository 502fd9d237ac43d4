"""Fixtures of the storage tests: one SeaweedFS S3 server per module, an empty bucket prefix per test."""

from __future__ import annotations

import secrets

import pytest

from tests.storage.seaweed import SeaweedS3


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture()
def s3(seaweed):
    """The server, started again if a test stopped it."""
    if seaweed.proc is None:
        seaweed.start()
    return seaweed


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test's own (tests share the bucket)."""
    return f"t{secrets.token_hex(4)}/"
