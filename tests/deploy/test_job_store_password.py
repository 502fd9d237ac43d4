"""The compose job store set-up: jobs.database_url without a password, PGPASSWORD in the environment.

A throwaway PostgreSQL with password (scram-sha-256) authentication on loopback, as the postgres
image sets up from POSTGRES_PASSWORD; the node's job store connects with the URL form used in
deploy/compose/ctp-node.toml.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ctp_node.config import load_settings
from ctp_node.node.shared.jobs import JobStore
from tests.deploy.tools import COMPOSE_DIR, missing
from tests.peers import stop_process, wait_for
from tests.ports import free_port, wait_for_port
from tests.postgres import _bin

PASSWORD = "s3cret-for-this-test"


def _start(folder: Path) -> tuple[subprocess.Popen, int]:
    initdb, postgres = _bin("initdb"), _bin("postgres")
    if not initdb or not postgres:
        missing("PostgreSQL server binaries", "apt-get install -y postgresql (.ci/run installs it)")
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD)
    as_postgres: dict = {}
    if os.geteuid() == 0:  # initdb refuses root; no runuser wrapper, so that SIGINT reaches the server
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []}
    subprocess.run(
        [initdb, "-D", str(folder / "data"), "-U", "ctp", "--auth=scram-sha-256", f"--pwfile={pwfile}"],
        check=True, capture_output=True, **as_postgres,
    )  # fmt: skip
    port = free_port()
    with open(folder / "postgres.log", "wb") as log:
        proc = subprocess.Popen(
            [postgres, "-D", str(folder / "data"), "-p", str(port), "-k", str(folder),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, **as_postgres,
        )  # fmt: skip
    try:
        wait_for_port(port, proc, "PostgreSQL")
    except Exception:
        _stop(proc)
        raise
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT), then the usual SIGTERM/SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(proc)


def _counts(url: str, password: str | None, monkeypatch) -> dict | Exception:
    """The job store's state counts, connecting with only PGPASSWORD (or nothing) for the password."""
    for key in [k for k in os.environ if k.startswith("PG")]:
        monkeypatch.delenv(key)
    if password is not None:
        monkeypatch.setenv("PGPASSWORD", password)
    store = None
    try:
        store = JobStore(url)
        return store.read.counts()
    except Exception as exc:  # psycopg/SQLAlchemy OperationalError: authentication failed
        return exc
    finally:
        if store is not None:
            store.engine.dispose()  # no idle connection to hold up the server's shutdown


def test_pgpassword_reaches_the_job_store(monkeypatch):
    compose_url = load_settings(COMPOSE_DIR / "ctp-node.toml").jobs.database_url
    url = compose_url.replace("@postgres:5432/", "@127.0.0.1:{port}/")
    assert url != compose_url, compose_url
    folder = Path(tempfile.mkdtemp(prefix="ctp-node-deploy-pg-"))  # not under root's private tmp_path
    proc = None
    try:
        proc, port = _start(folder)
        url = url.format(port=port).rsplit("/", 1)[0] + "/postgres"  # initdb makes no "ctp" database
        counts = wait_for(
            lambda: isinstance(c := _counts(url, PASSWORD, monkeypatch), dict) and c, timeout_s=20, what="PostgreSQL"
        )
        assert counts["done"] == 0
        assert "password authentication failed" in str(_counts(url, "wrong", monkeypatch))
        assert isinstance(_counts(url, None, monkeypatch), Exception), "no password, no connection"
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)
