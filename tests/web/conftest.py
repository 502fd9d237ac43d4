"""Fixtures: a node's data folder with jobs in several states, and a status page client over it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ctp_node.web import create_app
from ctp_node.web.auth import Authenticator
from tests.web.helpers import make_node


@pytest.fixture()
def node(tmp_path):
    return make_node(tmp_path / "data")


@pytest.fixture()
def client(node):
    settings, store = node
    with TestClient(create_app(settings, store, authenticator=Authenticator.from_settings(settings.web))) as c:
        yield c
