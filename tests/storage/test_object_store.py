"""The spool and results in a real S3 server (SeaweedFS on loopback), and back-pressure (issue 22 items 1, 4).

- storescu (DCMTK) -> receiver -> bucket; a worker on another data folder (a host that shares only
  the job store and the bucket) processes the series from the bucket and delivers to DCMTK storescp;
  neither host keeps an instance or a result on its disk afterwards.
- the object store stopped during a send: refusals (0xA7xx) while it is down, nothing acknowledged and
  lost (acknowledged == stored), normal service once it is started again, without a restart.
- bad settings: one line naming the key.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ctp_node.config import Settings
from ctp_node.errors import ConfigError
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore, State
from ctp_node.node.shared.object_store import StoreUnavailable
from ctp_node.node.shared.storage import open_object_store
from ctp_node.node.work.series_processor import make_processor
from ctp_node.node.work.worker import Worker
from ctp_node.series.pipeline import SeriesPipeline
from tests.dcmtk import dcmtk
from tests.deploy.tools import missing
from tests.integration.node_helpers import Watcher, cpu_checkpoint, node_settings, phantom_files
from tests.node.dicom_helpers import run
from tests.peers import stop_process, wait_for
from tests.ports import free_port, wait_for_port
from tests.storage.scu import instances, send
from tests.storage.seaweed import BUCKET, object_store_settings

pytestmark = pytest.mark.slow  # a real S3 server, DCMTK, a worker


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm")) if folder.exists() else []


@pytest.fixture()
def storescp(tmp_path):
    """DCMTK's storescp on a free loopback port, stopped by PID: the PACS the worker delivers to."""
    binary = dcmtk("storescp")
    if binary is None:
        missing("storescp (DCMTK)", "apt-get install dcmtk")
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    proc = subprocess.Popen([binary, "-od", str(received), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port, proc, "storescp", timeout_s=10)
        yield port, received
    finally:
        stop_process(proc)


def s3_settings(folder: Path, s3, prefix: str, database_url: str, **overrides) -> Settings:
    storage = {"object_store": object_store_settings(s3, prefix=prefix), "check_interval_s": 0.5}
    storage.update(overrides.pop("storage", {}))
    return node_settings(
        folder, overrides.pop("checkpoint", folder / "unused.pt"), overrides.pop("pacs_port", None),
        storage=storage, jobs={"database_url": database_url}, **overrides,
    )  # fmt: skip


def test_storescu_into_the_bucket_and_a_worker_host_processes_from_it(tmp_path, s3, prefix, storescp, caplog):
    storescu = dcmtk("storescu")
    if storescu is None:
        missing("storescu (DCMTK)", "apt-get install dcmtk")
    pacs_port, pacs_folder = storescp
    files = phantom_files(tmp_path / "study")
    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"  # the one thing besides the bucket the hosts share
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    receiving = s3_settings(tmp_path / "receiver", s3, prefix, database, checkpoint=checkpoint, pacs_port=pacs_port)
    store = JobStore(database)
    receiver = Receiver(receiving, store)
    receiver.start()
    try:
        with Watcher(receiver):
            sent = run(storescu, "-aet", "SCANNER", "-aec", "CTPNODE", "127.0.0.1", str(receiving.dicom.port),
                       *map(str, files))  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            job = wait_for(lambda: (j := store.read.jobs([State.QUEUED])) and j[0], what="series queued")
    finally:
        receiver.stop()
    uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    spooled = s3.list_keys(f"{prefix}spool/")
    assert {Path(k).stem for k in spooled} == uids and job.instances == len(files)
    assert all(k.startswith(f"{prefix}spool/{job.study_uid}/{job.series_uid}/") for k in spooled)
    assert dcm_files(receiving.storage.data_dir) == []  # the receiving host kept nothing

    # A worker "host": its own data folder, the same job store and bucket.
    working = s3_settings(tmp_path / "worker", s3, prefix, database, checkpoint=checkpoint, pacs_port=pacs_port)
    worker = Worker(working, store, make_processor(SeriesPipeline.from_settings(working)), worker_id="w2")
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        assert worker.run_once() is not None
    done = store.get(job.id)
    assert done.state == State.DONE, done.error
    # A recorded result is not said to be "processed again" (it was, with an object store, after each job).
    assert not any("changed while processing" in r.getMessage() for r in caplog.records)
    generation = f"s3://{BUCKET}/{prefix}results/{job.study_uid}/{job.series_uid}/g{job.generation}/"
    assert done.result_dir.startswith(generation) and done.result_dir[len(generation) :].isalnum()  # its attempt
    results = [k for k in s3.list_keys(f"{prefix}results/") if k.endswith(".dcm")]
    delivered = dcm_files(pacs_folder) + [p for p in pacs_folder.iterdir() if p.is_file() and p.suffix != ".dcm"]
    assert len(results) >= 25 * 8 and len(delivered) == len(results)  # the 1 s series (and any outputs)
    assert dcm_files(working.storage.data_dir) == []  # scratch emptied: the worker host keeps nothing
    assert not list(working.storage.scratch_dir.glob("*/*"))


def test_object_store_down_during_a_send_refuses_loses_nothing_and_recovers(tmp_path, s3, prefix, caplog):
    settings = s3_settings(tmp_path / "node", s3, prefix, f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    receiver.start()
    study, series = generate_uid(), generate_uid()
    acknowledged: set[str] = set()
    try:
        before = instances(tmp_path / "a", 5, (study, series))
        during = instances(tmp_path / "b", 5, (study, series))

        # One association: 5 instances, the store stops, 5 more.
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title="CTPNODE")
        assert assoc.is_established
        statuses = {}
        try:
            for path in before:
                statuses[path] = int(assoc.send_c_store(dcmread(path)).Status)
            s3.stop()
            for path in during:
                statuses[path] = int(assoc.send_c_store(dcmread(path)).Status)
        finally:
            assoc.release()
        assert [statuses[p] for p in before] == [0] * 5
        refused = [statuses[p] for p in during]
        assert all(0xA700 <= s <= 0xA7FF for s in refused), [hex(s) for s in refused]
        acknowledged |= {dcmread(p).SOPInstanceUID for p in before}
        assert receiver.health.problems() and "object_store" in receiver.health.problems()[0]
        assert receiver.metrics.refused.labels("object_store")._value.get() == 5
        assert receiver.metrics.resource_available.labels("object_store")._value.get() == 0

        # A worker claims nothing meanwhile (a job's attempt would be spent for nothing): its loop waits.
        worker = Worker(settings, store, lambda job, files, out: None, worker_id="w-down")
        with pytest.raises(StoreUnavailable):
            worker.run_once()

        # The store comes back: the receiver finds it by itself (no restart), the sender retries.
        s3.start()
        wait_for(lambda: not receiver.health.problems(), timeout_s=30, what="the receiver to see the store back")
        assert receiver.metrics.resource_available.labels("object_store")._value.get() == 1
        after = instances(tmp_path / "c", 5, (study, series))
        again = [s for s, _ in send(settings.dicom.port, during + after)]
        assert again == [0] * 10
        acknowledged |= {dcmread(p).SOPInstanceUID for p in during + after}
        receiver.recorder.flush()
    finally:
        receiver.stop()
    stored = {Path(k).stem for k in s3.list_keys(f"{prefix}spool/")}
    assert stored == acknowledged and len(stored) == 15  # acknowledged == stored: nothing lost
    job = store.find(series)
    assert job is not None and job.instances == 15
    assert dcm_files(settings.storage.data_dir) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("object_store unavailable" in m for m in messages)
    assert any("object_store available again" in m for m in messages)


def test_a_bucket_that_does_not_exist_or_refused_credentials_are_one_line_naming_the_key(tmp_path, s3, monkeypatch):
    def storage(**overrides):
        return Settings(storage={"data_dir": str(tmp_path), "object_store": object_store_settings(s3, **overrides)})

    with pytest.raises(ConfigError, match=r"^storage\.object_store\.bucket: the bucket 'no-such-bucket' does not"):
        open_object_store(storage(bucket="no-such-bucket").storage)
    monkeypatch.setenv("WRONG_SECRET", "not-the-secret")
    with pytest.raises(ConfigError, match=r"^storage\.object_store\.secret_access_key: the object store refused"):
        open_object_store(storage(secret_access_key={"env": "WRONG_SECRET"}).storage)
    monkeypatch.delenv("UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^storage\.object_store\.access_key_id: .*UNSET_KEY"):
        open_object_store(storage(access_key_id={"env": "UNSET_KEY"}).storage)
    # A credentials file (AWS format) is the other way in.
    credentials = tmp_path / "credentials"
    credentials.write_text("[ctp]\naws_access_key_id = ctp-node-test\naws_secret_access_key = ctp-node-test-secret\n")
    settings = storage(access_key_id=None, secret_access_key=None, credentials_file=str(credentials), profile="ctp")
    assert open_object_store(settings.storage) is not None


def test_serve_with_a_bucket_that_does_not_exist_stops_with_one_line_naming_the_key(tmp_path, s3):
    import sys

    import tomli_w

    storage = {"data_dir": str(tmp_path / "data"), "object_store": object_store_settings(s3, bucket="missing-bucket")}
    config = tmp_path / "node.toml"
    config.write_text(tomli_w.dumps({"dicom": {"bind_address": "127.0.0.1", "port": free_port()}, "storage": storage}))
    command = [sys.executable, "-m", "ctp_node", "serve", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: storage.object_store.bucket: the bucket 'missing-bucket' does not exist at {s3.endpoint} "
                     "(create it first)"], done.stderr  # fmt: skip


def test_tls_to_the_store_is_verified_against_the_configured_ca(tmp_path):
    from ctp_node.node.shared.object_spool import ObjectSpool
    from ctp_node.node.shared.spool import SeriesKey
    from tests.peers import self_signed_certificate
    from tests.storage.seaweed import SeaweedS3

    (tmp_path / "tls").mkdir()
    cert, key = self_signed_certificate(tmp_path / "tls")
    server = SeaweedS3(tmp_path / "seaweed-tls", tls=(cert, key))
    try:

        def storage(**overrides):
            store = object_store_settings(server, endpoint=server.https_endpoint, **overrides)
            return Settings(storage={"data_dir": str(tmp_path / "data"), "object_store": store}).storage

        with pytest.raises(ConfigError, match=r"^storage\.object_store\.ca_certificates: the TLS certificate of https"):
            open_object_store(storage())  # the system's CAs do not know the self-signed certificate
        with pytest.raises(ConfigError, match=r"^storage\.object_store\.ca_certificates: .* is not a file"):
            open_object_store(storage(ca_certificates=str(tmp_path / "no-such-ca.pem")))
        settings = storage(ca_certificates=str(cert))
        spool = ObjectSpool(settings.spool_dir, open_object_store(settings))
        uri = spool.write(SeriesKey("1.2.3", "1.2.3.4"), "1.2.3.4.5", b"DICM over TLS")
        key = "spool/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        assert uri == f"s3://{BUCKET}/{key}" and key in server.list_keys()
    finally:
        server.stop()


def test_each_attempt_uploads_under_its_own_keys_and_the_recorded_one_keeps_only_its_own(tmp_path, s3, prefix):
    """Two attempts of one generation overlap (a worker cut off, its lease taken): neither may touch the
    other's objects while both upload; the one recorded removes the other's leftovers, the one not
    recorded removes its own."""
    from ctp_node.node.shared.object_results import ObjectResults

    settings = Settings(storage={"data_dir": str(tmp_path), "object_store": object_store_settings(s3, prefix=prefix)})
    results = ObjectResults(open_object_store(settings.storage))
    study, series = generate_uid(), generate_uid()
    staged = {}
    for attempt, text in (("aaa111", "first"), ("bbb222", "second")):
        folder = tmp_path / attempt
        (folder / "perfusion").mkdir(parents=True)
        (folder / "0001.dcm").write_text(text)
        (folder / "perfusion" / "report.pdf").write_text(text)
        staged[attempt] = results.publish(folder, study, series, 1, attempt)
    assert staged["aaa111"] != staged["bbb222"]
    generation = f"{prefix}results/{study}/{series}/g1/"
    assert len(s3.list_keys(generation)) == 4  # both attempts whole: the second replaced nothing
    fetched = results.fetch(staged["aaa111"], tmp_path / "fetched")
    assert (fetched / "0001.dcm").read_text() == "first" and (fetched / "perfusion" / "report.pdf").exists()

    assert results.keep_only(staged["aaa111"], study, series, 1) == 2
    kept = [f"{generation}aaa111/0001.dcm", f"{generation}aaa111/perfusion/report.pdf"]
    assert sorted(s3.list_keys(generation)) == kept
    results.discard(staged["aaa111"])
    assert s3.list_keys(generation) == []
    with pytest.raises(ValueError, match="letters and digits"):
        results.publish(tmp_path / "aaa111", study, series, 1, "../x")


def test_reprocess_reads_the_series_from_the_object_store(tmp_path, s3, prefix):
    """`ctp-node reprocess` on a node whose spool is the bucket: to a folder (downloaded to scratch,
    which is emptied after) and queued again; a series the bucket does not hold is a clear error."""
    import pydicom
    from typer.testing import CliRunner

    from ctp_node.cli.main import app
    from ctp_node.node.shared.spool import SeriesKey
    from ctp_node.node.shared.storage import open_spool
    from tests.integration.node_helpers import write_config

    files = phantom_files(tmp_path / "study", duration_s=13)
    database = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    settings = s3_settings(tmp_path / "node", s3, prefix, database, checkpoint=cpu_checkpoint(tmp_path / "net.pt"))
    config = write_config(tmp_path / "ctp-node.toml", settings)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    key = SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    spool, store = open_spool(settings.storage, open_object_store(settings.storage)), JobStore(database)
    for path in files:
        spool.write(key, pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, path.read_bytes())
        store.record_instance(key.study_uid, key.series_uid, "S")
    assert not list(settings.storage.spool_dir.rglob("*.dcm"))  # the series is only in the bucket

    runner = CliRunner()
    again = runner.invoke(app, ["reprocess", key.series_uid, "-o", str(tmp_path / "again"), "-c", str(config)])
    assert again.exit_code == 0, again.output
    assert len(list((tmp_path / "again" / key.series_uid).glob("*.dcm"))) == 13 * 8
    assert not list(settings.storage.scratch_dir.glob("*/*"))  # the download is gone
    queued = runner.invoke(app, ["reprocess", key.series_uid, "-c", str(config)])
    assert queued.exit_code == 0 and store.find(key.series_uid).state == State.QUEUED
    store.record_instance("1.2.3", "1.2.3.4", "S")  # a job whose instances the bucket does not hold
    missing_series = runner.invoke(app, ["reprocess", "1.2.3.4", "-c", str(config)])
    assert missing_series.exit_code == 2 and "holds no instances" in missing_series.output
