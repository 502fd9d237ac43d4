"""The sites the multi-host cases stand up, each host its own network namespace.

``start_site`` (the worker-failure cases): PostgreSQL and SeaweedFS on a db host, two receivers, two
workers, a PACS (DCMTK storescp, one file per C-STORE received) and a scanner. ``start_receivers`` (the
split-series and audit cases): PostgreSQL on a db host, two receivers on their own local spools, a
scanner. The study is the phantom's 13 s sampled every 4 s (32 instances in; a 1 s series of 13 x 8 out)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from tests.dcmtk import require
from tests.integration.node_helpers import cpu_checkpoint, node_settings, phantom_files
from tests.multihost.db import sql_uid, start_postgres
from tests.multihost.hosts import Host, Network
from tests.multihost.nodes import AE_TITLE, DICOM_PORT, start_node, wait_echo, write_config
from tests.multihost.s3 import start_seaweed
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY

SECONDS, SLICES = 13, 8
LEASE_S = 4
PACS_AE = "PACS"

# Run in the PACS host's mount namespace: (SOPInstanceUID, SeriesInstanceUID) of every file storescp wrote.
READ_DELIVERED = """
import json, pathlib, sys
import pydicom
print(json.dumps([[ds.SOPInstanceUID, ds.SeriesInstanceUID] for ds in
      (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(pathlib.Path(sys.argv[1]).iterdir()))]))
"""


@dataclass
class Site:
    network: Network
    tmp_path: Path
    files: list[Path]
    series_uid: str
    receivers: list[Host]
    workers: list[Host]
    pacs: Host
    scanner: Host
    postgres: object  # tests.multihost.db's server handle
    s3: object  # tests.multihost.s3's server handle
    storescp: object
    procs: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"series_uid = {sql_uid(self.series_uid)}"

    def job(self) -> list[str] | None:
        """(state, lease owner, lease expiry epoch, attempts, instances, result address) of the series."""
        found = self.postgres.query(
            self.scanner,
            "select state, lease_owner, extract(epoch from lease_expires_at), attempts, instances,"
            f" result_dir from series where {self.where}",
        )
        return found[0] if len(found) == 1 else None

    def deliveries(self) -> list[list[str]]:
        return self.postgres.query(
            self.scanner,
            "select d.state, d.instances_sent from deliveries d join series s on s.id = d.series_id"
            f" where s.{self.where}",
        )

    def delivered_now(self) -> list[list[str]]:
        """[SOPInstanceUID, SeriesInstanceUID] of every C-STORE the PACS received, in file order."""
        read = self.pacs.exec_in(
            self.storescp, [sys.executable, "-c", READ_DELIVERED, str(self.pacs.data_dir)], timeout_s=120
        )
        assert read.returncode == 0, read.stderr
        return json.loads(read.stdout)

    def audit_of(self, host: Host) -> list[dict]:
        """The host's audit events about this series."""
        text = host.exec_in(self.procs[host.name], ["cat", str(host.data_dir / "audit.jsonl")]).stdout
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [e for e in events if self.series_uid in (e.get("series_uid"), e.get("source_series_uid"))]

    def log_of(self, host: Host) -> str:
        return (self.tmp_path / f"{host.name}.log").read_text(errors="replace")


def start_site(network: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    """Every host and service up, the node processes started; nothing sent yet."""
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    (series_uid,) = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    monkeypatch.setenv("CTP_NODE_TEST_S3_KEY", ACCESS_KEY)  # the node processes inherit them
    monkeypatch.setenv("CTP_NODE_TEST_S3_SECRET", SECRET_KEY)

    db_host = network.add_host("db")
    receivers = [network.add_host("recv1"), network.add_host("recv2")]
    workers = [network.add_host("work1"), network.add_host("work2")]
    pacs, scanner = network.add_host("pacs"), network.add_host("scanner")

    postgres = start_postgres(db_host, tmp_path / "postgres.log")
    s3 = start_seaweed(db_host, tmp_path / "weed.log", tmp_path)
    s3.wait_ready(scanner)
    storescp = pacs.run(
        [require("storescp"), "+uf", "-fe", ".dcm", "-aet", PACS_AE, "-od", str(pacs.data_dir), str(DICOM_PORT)],
        tmp_path / "storescp.log",
    )  # fmt: skip
    wait_echo(pacs, storescp, PACS_AE, tmp_path / "storescp.log")
    site = Site(network, tmp_path, files, series_uid, receivers, workers, pacs, scanner, postgres, s3, storescp)

    object_store = {
        "endpoint": s3.endpoint,
        "bucket": BUCKET,
        "access_key_id": {"env": "CTP_NODE_TEST_S3_KEY"},
        "secret_access_key": {"env": "CTP_NODE_TEST_S3_SECRET"},
        "timeout_s": 5,
    }
    destination = {"name": "pacs", "host": pacs.address, "port": DICOM_PORT, "ae_title": PACS_AE}
    for host in [*receivers, *workers]:
        settings = node_settings(
            host.data_dir, checkpoint, None,
            dicom={"bind_address": host.address, "port": DICOM_PORT, "ae_title": AE_TITLE},
            storage={"object_store": object_store, "check_interval_s": 0.5},
            jobs={"database_url": postgres.url, "lease_s": LEASE_S, "heartbeat_s": 1},
        )  # fmt: skip
        config = write_config(tmp_path / f"{host.name}.toml", settings, destinations=[destination])
        verb = "serve" if host in receivers else "worker"
        site.procs[host.name] = start_node(host, verb, config, tmp_path / f"{host.name}.log")
    return site


@dataclass
class Receivers:
    """Two receivers on one PostgreSQL job store, each spooling on its own tmpfs; nothing sent yet."""

    files: list[Path]
    series_uid: str
    sop_uids: list[str]  # sorted
    checkpoint: Path  # the settings name one; a receiver never loads it
    hosts: list[Host]
    scanner: Host
    postgres: object  # tests.multihost.db's server handle
    procs: list
    settings: object  # the receivers' Settings (the last one written; all alike but the address)


def start_receivers(network: Network, tmp_path: Path) -> Receivers:
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    (series_uid,) = {ds.SeriesInstanceUID for ds in headers}
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    db_host = network.add_host("db")
    hosts = [network.add_host("recv1"), network.add_host("recv2")]
    scanner = network.add_host("scanner")
    postgres = start_postgres(db_host, tmp_path / "postgres.log")
    procs = []
    for host in hosts:
        settings = node_settings(
            host.data_dir, checkpoint, None,
            dicom={"bind_address": host.address, "port": DICOM_PORT, "ae_title": AE_TITLE},
            jobs={"database_url": postgres.url},
        )  # fmt: skip
        config = write_config(tmp_path / f"{host.name}.toml", settings)
        procs.append(start_node(host, "serve", config, tmp_path / f"{host.name}.log"))
    sop_uids = sorted(ds.SOPInstanceUID for ds in headers)
    return Receivers(files, series_uid, sop_uids, checkpoint, hosts, scanner, postgres, procs, settings)
