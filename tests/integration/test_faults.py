"""Faults with real processes and peers: a destination that is down, SIGKILL while receiving,
processing and sending, bad input while the node keeps serving, a series whose header is wrong
(failed once, never retried) and a disk fault (retried). Every series must end up in Orthanc
exactly once, with every instance."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ctp_node.node.shared.jobs import JobStore, State
from ctp_node.node.shared.spool import SeriesKey, Spool
from ctp_node.node.work.series_processor import make_processor
from ctp_node.node.work.worker import Worker
from ctp_node.series.pipeline import SeriesPipeline
from tests.dcmtk import require
from tests.integration.node_helpers import (
    cpu_checkpoint,
    node_settings,
    phantom_files,
    start_node_process,
    write_config,
)
from tests.node.dicom_helpers import ct_instance, run
from tests.peers import start_orthanc, wait_for
from tests.ports import free_port, wait_for_port

pytestmark = pytest.mark.slow
SECONDS, SLICES = 17, 8  # phantom: 17 s sampled every 4 s (5 volumes), 8 slices


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def orthanc_instances(orthanc) -> int:
    return sum(len(orthanc.get(f"/series/{s}")["Instances"]) for s in orthanc.get("/series"))


@pytest.fixture()
def node(tmp_path):
    """Config for a node sending to a real Orthanc; the test starts the processes it needs."""
    orthanc = start_orthanc(tmp_path / "orthanc")
    settings = node_settings(
        tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), orthanc.dicom_port,
        jobs={"lease_s": 4, "heartbeat_s": 1},
    )  # fmt: skip
    config = write_config(tmp_path / "ctp-node.toml", settings)
    procs: list[subprocess.Popen] = []
    yield settings, config, orthanc, procs
    for proc in procs:
        kill(proc)
    orthanc.stop()


def serve(settings, config, tmp_path, procs):
    proc = start_node_process("serve", config, tmp_path / "serve.log")
    procs.append(proc)
    wait_for_port(settings.dicom.port, proc, "ctp-node serve")
    return proc


def storescu_args(settings, files):
    return [
        require("storescu"),
        "-aet",
        "SCANNER",
        "-aec",
        "CTPNODE",
        "127.0.0.1",
        str(settings.dicom.port),
        *map(str, files),
    ]


def spooled_worker(settings, files) -> tuple[JobStore, Worker]:
    """The files spooled and their series queued, and a worker with the real pipeline."""
    store = JobStore(settings.database_url)
    spool = Spool(settings.storage.spool_dir)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.write(SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID), ds.SOPInstanceUID, path.read_bytes())
        store.record_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, "SCANNER")
    store.queue_quiet_series(0)
    return store, Worker(settings, store, make_processor(SeriesPipeline.from_settings(settings)), worker_id="w1")


def due_now(store: JobStore) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")


def test_destination_down_then_back_is_delivered_once(tmp_path):
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    port = free_port()
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), port)
    store, worker = spooled_worker(settings, files)
    job = worker.run_once()  # PACS down: processed, the send fails and is scheduled again
    waiting = store.get(job.id)
    assert waiting.state == State.SENDING and "no association" in store.deliveries(job.id)[0].error
    orthanc = start_orthanc(tmp_path / "orthanc", dicom_port=port)  # the PACS comes back
    try:
        wait_for(lambda: worker.run_once() and store.get(job.id).state == State.DONE, what="delivery", interval=0.3)
        assert len(orthanc.get("/series")) == 1
        assert orthanc_instances(orthanc) == SECONDS * SLICES
        assert [d.state for d in store.deliveries(job.id)] == ["sent"]
    finally:
        orthanc.stop()


def test_sigkill_while_receiving_loses_nothing(tmp_path, node):
    settings, config, orthanc, procs = node
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    server = serve(settings, config, tmp_path, procs)
    sender = subprocess.Popen(storescu_args(settings, files), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spool = settings.storage.spool_dir
    wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= len(files) // 3, what="a third of the study")
    kill(server)
    sender.wait(timeout=30)
    # Restarted, the node is sent the whole study again (what a scanner or PACS does after a failure).
    serve(settings, config, tmp_path, procs)
    assert run(*storescu_args(settings, files)).returncode == 0
    assert len(list(spool.rglob("*.dcm"))) == len(files)
    assert not list(spool.rglob("*.part"))
    store = JobStore(settings.database_url)
    wait_for(lambda: store.read.jobs([State.QUEUED]), what="series queued")
    procs.append(start_node_process("worker", config, tmp_path / "worker.log", "--once"))
    procs[-1].wait(timeout=300)
    job = store.read.jobs()[0]
    why = (job.error, store.deliveries(job.id), (tmp_path / "worker.log").read_text()[-2000:])
    assert job.state == State.DONE, why
    assert len(orthanc.get("/series")) == 1 and orthanc_instances(orthanc) == SECONDS * SLICES


@pytest.mark.parametrize("moment", [State.PROCESSING, State.SENDING])
def test_sigkill_while_working_is_taken_over_and_delivered_once(tmp_path, node, moment):
    settings, config, orthanc, procs = node
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    serve(settings, config, tmp_path, procs)
    assert run(*storescu_args(settings, files)).returncode == 0
    store = JobStore(settings.database_url)
    wait_for(lambda: store.read.jobs([State.QUEUED]), what="series queued")
    first = start_node_process("worker", config, tmp_path / "worker1.log")
    procs.append(first)
    wait_for(lambda: store.read.jobs([moment]), what=f"state {moment.value}", interval=0.01, timeout_s=300)
    kill(first)
    job = store.read.jobs()[0]
    assert job.state == moment
    # Its lease expires (4 s); a second worker takes the job over.
    procs.append(start_node_process("worker", config, tmp_path / "worker2.log"))
    done = wait_for(lambda: store.get(job.id).state == State.DONE and store.get(job.id), what="done", timeout_s=300)
    assert done.state == State.DONE
    assert "claimed series" in (tmp_path / "worker2.log").read_text()  # the second worker finished it
    assert len(orthanc.get("/series")) == 1 and orthanc_instances(orthanc) == SECONDS * SLICES


def _send(port: int, datasets) -> list[int]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_bad_input_is_refused_with_a_reason_while_the_node_keeps_serving(tmp_path, node):
    settings, config, orthanc, procs = node
    serve(settings, config, tmp_path, procs)
    port = settings.dicom.port
    study = generate_uid()
    # 1. not CTP: one time point
    single = [
        ct_instance(tmp_path / f"single{i}.dcm", study=study, series="1.2.826.0.1.3680043.10.1.1", value=i)
        for i in range(2)
    ]
    for i, ds in enumerate(single):
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 5.0 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.AcquisitionTime = [0.5, 0.5], "120000"
    # 2. corrupt: pixel data shorter than the header says
    corrupt = ct_instance(tmp_path / "corrupt.dcm", study=study, series="1.2.826.0.1.3680043.10.1.2")
    corrupt.PixelData = corrupt.PixelData[:100]
    # 3. absurd header: zero rows
    absurd = ct_instance(tmp_path / "absurd.dcm", study=study, series="1.2.826.0.1.3680043.10.1.3")
    absurd.Rows = 0
    assert _send(port, [*single, corrupt, absurd]) == [0, 0, 0, 0]  # stored as received; judged when complete
    # 4. truncated: a phantom study with one instance missing
    files = phantom_files(tmp_path / "study", duration_s=SECONDS)
    assert run(*storescu_args(settings, files[:-1])).returncode == 0
    store = JobStore(settings.database_url)
    wait_for(lambda: len(store.read.jobs([State.QUEUED])) == 4, what="four series queued")
    procs.append(start_node_process("worker", config, tmp_path / "worker.log", "--once"))
    procs[-1].wait(timeout=300)
    by_series = {j.series_uid: j for j in store.read.jobs()}
    assert by_series["1.2.826.0.1.3680043.10.1.1"].state == State.IGNORED
    assert "time point" in by_series["1.2.826.0.1.3680043.10.1.1"].error
    for uid in ("1.2.826.0.1.3680043.10.1.2", "1.2.826.0.1.3680043.10.1.3"):
        assert by_series[uid].state in (State.FAILED, State.IGNORED) and by_series[uid].error
    truncated = [j for j in store.read.jobs() if not j.series_uid.startswith("1.2.826.0.1.3680043.10.1.")][0]
    assert truncated.state == State.FAILED and "Incomplete" in truncated.error
    assert orthanc.get("/series") == []
    # ... and the node still answers
    assert run(require("echoscu"), "-aec", "CTPNODE", "127.0.0.1", str(port)).returncode == 0


def header_source(files: list[Path]) -> list[Path]:
    """The instance the derived writer copies the patient/study header and rescale from: the first spooled file."""
    return [min(files, key=lambda p: f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm")]


@pytest.mark.parametrize(
    ("edited", "reason"),
    [
        (header_source, "DerivedSeriesError: .* states RescaleSlope 0: its pixel values cannot be HU"),
        (lambda files: files, "GridError: no intracranial region found"),  # every instance: all HU the intercept
    ],
    ids=["header-source", "every-instance"],
)
def test_a_series_stating_rescale_slope_0_fails_once_with_the_reason_and_no_traceback(tmp_path, caplog, edited, reason):
    files = phantom_files(tmp_path / "study", duration_s=9)
    for path in edited(files):  # a scanner (or a PACS rule) that wrote RescaleSlope 0
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = 0
        ds.save_as(path)
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), None)
    store, worker = spooled_worker(settings, files)
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        job = worker.run_once()
        due_now(store)
        assert worker.run_once() is None, "an input fault is not retried"
    failed = store.get(job.id)
    assert failed.state == State.FAILED and failed.attempts == 1 and failed.next_attempt_at is None
    assert re.match(reason, failed.error), failed.error
    assert not [r for r in caplog.records if r.exc_info], "reported as a reason, not a traceback"
    assert [e["event"] for e in worker.audit.read()] == ["processing"]
    assert not list(settings.storage.results_dir.rglob("*.dcm")), "nothing half-written is left to send"


def test_a_disk_fault_while_writing_the_result_is_retried_and_then_succeeds(tmp_path, caplog):
    files = phantom_files(tmp_path / "study", duration_s=9)
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), None)
    store, worker = spooled_worker(settings, files)
    blocker = settings.storage.results_dir
    blocker.write_text("a file where the results folder should be")  # the folder cannot be made: an OSError
    with caplog.at_level(logging.WARNING, logger="ctp_node"):
        job = worker.run_once()
    waiting = store.get(job.id)
    assert waiting.state == State.QUEUED and waiting.next_attempt_at is not None, waiting.error
    assert "Error" in waiting.error and str(blocker) in waiting.error
    assert worker.run_once() is None, "retried only after the backoff"
    assert not [r for r in caplog.records if r.exc_info]
    blocker.unlink()  # the disk is fixed
    due_now(store)
    worker.run_once()
    done = store.get(job.id)
    assert done.state == State.DONE and done.error is None
    assert len(list(Path(done.result_dir).glob("*.dcm"))) == 9 * 8
