"""Fixtures of the deploy checks: the object store that deploy/compose.yaml's seaweedfs service stands
for, a real SeaweedFS on loopback (one per module; skipped without the weed binary, failed in CI)."""

from __future__ import annotations

import pytest

from tests.storage.seaweed import SeaweedS3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()
