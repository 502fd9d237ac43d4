"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, a free loopback port, stopped
by PID. Uses the Debian server binaries (/usr/lib/postgresql/*/bin); initdb refuses root, so as root
the server runs as the ``postgres`` system user."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.peers import stop_process
from tests.ports import free_port, wait_for_port


def _bin(tool: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found[-1] if found else shutil.which(tool)


class PostgresServer:
    def __init__(self) -> None:
        initdb, postgres = _bin("initdb"), _bin("postgres")
        if not initdb or not postgres:
            pytest.skip("PostgreSQL server binaries are not installed; .ci/run installs them")
        self.port = free_port()
        # Its own folder directly under /tmp: pytest's tmp_path is private to root, which the
        # postgres user could not enter.
        folder = self.folder = Path(tempfile.mkdtemp(prefix="ctp-node-pg-"))
        data = folder / "data"
        prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "ctp", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        with open(folder / "postgres.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    postgres,
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-k",
                    str(folder),
                    "-c",
                    "fsync=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.proc, "PostgreSQL")
        for _ in range(50):  # the port opens before the server accepts connections
            ready = subprocess.run(
                [_bin("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if ready.returncode == 0:
                break
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://ctp@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)
