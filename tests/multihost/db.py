"""PostgreSQL on a test host: initdb and the server in the host's own tmpfs, listening on the host's
address only, trusting the test subnet; queried with psql from another host (the root namespace
cannot reach it).

The Debian server binaries (/usr/lib/postgresql/*/bin); initdb refuses root, so both run as the
``postgres`` system user through ``setpriv`` (which execs: the Popen's PID is the postmaster's, and
the network stops it with SIGINT, PostgreSQL's fast shutdown, which does not wait for clients).
"""

from __future__ import annotations

import glob
import re
import shutil
import signal
import time
from dataclasses import dataclass

from tests.deploy.tools import missing
from tests.multihost.hosts import PREFIX_LEN, SUBNET, Host

PORT = 5432
USER = "ctp"
DATABASE = "postgres"


def pg_binary(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    path = found[-1] if found else shutil.which(tool)
    if path is None:
        missing(f"PostgreSQL's {tool}", "apt-get install postgresql")
    return str(path)


@dataclass
class HostedPostgres:
    host: Host
    proc: object

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@{self.host.address}:{PORT}/{DATABASE}"

    def query(self, client: Host, sql: str, timeout_s: float = 20) -> list[list[str]]:
        """Rows of ``sql`` (psql, unaligned, tab-separated) asked from ``client``'s namespace."""
        done = client.exec(
            [pg_binary("psql"), "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-h", self.host.address,
             "-p", str(PORT), "-U", USER, "-d", DATABASE, "-c", sql],
            timeout_s=timeout_s,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql from {client.name}: {done.stderr.strip()}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]


def start_postgres(host: Host, log, timeout_s: float = 60) -> HostedPostgres:
    """PostgreSQL on ``host`` (data in its tmpfs), ready for connections from the other hosts."""
    initdb, postgres, ready = pg_binary("initdb"), pg_binary("postgres"), pg_binary("pg_isready")
    folder = str(host.data_dir)
    as_postgres = "setpriv --reuid=postgres --regid=postgres --init-groups --"
    script = (
        f'chown postgres:postgres "{folder}" && '
        f'{as_postgres} {initdb} -D "{folder}/data" -U {USER} --auth=trust -E UTF8 >/dev/null && '
        f'echo "host all all {SUBNET}.0/{PREFIX_LEN} trust" >> "{folder}/data/pg_hba.conf" && '
        f'exec {as_postgres} {postgres} -D "{folder}/data" -p {PORT} -k "{folder}" '
        f"-c listen_addresses={host.address} -c fsync=off -c max_connections=50"
    )
    proc = host.run(["sh", "-c", script], log, stop_signal=signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL on {host.name} exited with {proc.returncode}; see {log}")
        if host.exec([ready, "-q", "-h", host.address, "-p", str(PORT), "-t", "2"], timeout_s=10).returncode == 0:
            return HostedPostgres(host, proc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL on {host.name} not ready within {timeout_s} s; see {log}")
        time.sleep(0.2)


UID = re.compile(r"^[0-9.]{1,64}$")


def sql_uid(uid: str) -> str:
    """A DICOM UID as an SQL literal (checked: digits and dots only)."""
    if not UID.match(uid):
        raise ValueError(f"not a DICOM UID: {uid!r}")
    return f"'{uid}'"
