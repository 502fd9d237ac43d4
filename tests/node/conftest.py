"""Fixtures of the node tests: job stores on SQLite and PostgreSQL, and a worker's queued series."""

from __future__ import annotations

import pytest

from tests.node.worker_helpers import queued_series


@pytest.fixture(scope="module")
def postgres():
    from tests.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty job store's URL, once on SQLite and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    url = request.getfixturevalue("postgres").url
    from sqlalchemy import create_engine

    from ctp_node.node.shared.job_tables import metadata

    engine = create_engine(url)
    metadata.drop_all(engine)  # a clean store per test
    engine.dispose()
    return url


@pytest.fixture()
def env(tmp_path):
    """(settings, job store) with tests.node.worker_helpers.KEY queued for a worker."""
    return queued_series(tmp_path)
