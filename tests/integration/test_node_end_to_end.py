"""storescu (DCMTK) -> ctp-node -> Orthanc, read back through Orthanc's REST API."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore, State
from ctp_node.node.work.series_processor import make_processor
from ctp_node.node.work.worker import Worker
from ctp_node.series.pipeline import SeriesPipeline
from tests.dcmtk import require
from tests.integration.node_helpers import Watcher, cpu_checkpoint, node_settings, phantom_files
from tests.node.dicom_helpers import run
from tests.peers import start_orthanc, wait_for


@pytest.fixture()
def orthanc(tmp_path):
    pacs = start_orthanc(tmp_path / "orthanc")
    yield pacs
    pacs.stop()


@pytest.mark.parametrize("syntax", ["explicit", "jpeg-lossless"])
def test_storescu_to_node_to_orthanc(tmp_path, orthanc, syntax):
    storescu = require("storescu")
    files = phantom_files(tmp_path / "study", syntax=syntax)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), orthanc.dicom_port)
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    receiver.start()
    try:
        with Watcher(receiver):
            sent = run(
                storescu,
                "-xs",
                "-aet",
                "SCANNER",
                "-aec",
                "CTPNODE",
                "127.0.0.1",
                str(settings.dicom.port),
                *map(str, files),
            )
            assert sent.returncode == 0, sent.stderr
            job = wait_for(lambda: (j := store.read.jobs([State.QUEUED])) and j[0], what="series queued")
    finally:
        receiver.stop()
    assert job.instances == len(files) == 7 * 8
    worker = Worker(settings, store, make_processor(SeriesPipeline.from_settings(settings)), worker_id="w1")
    assert worker.run_once() is not None
    done = store.get(job.id)
    assert done.state == State.DONE, done.error

    series = orthanc.get("/series")
    assert len(series) == 1  # the node sends only the derived series
    info = orthanc.get(f"/series/{series[0]}")
    assert len(info["Instances"]) == 25 * 8  # 1 s grid from 0 to 24 s, 8 slices
    derived = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i))) for i in info["Instances"]]
    first = source[0]
    assert {d.StudyInstanceUID for d in derived} == {first.StudyInstanceUID}
    assert {d.FrameOfReferenceUID for d in derived} == {first.FrameOfReferenceUID}
    assert {d.SeriesInstanceUID for d in derived} != {first.SeriesInstanceUID}
    assert all("SYNTHETIC" in d.SeriesDescription for d in derived)
    synthetic = [d for d in derived if "SECONDARY" in d.ImageType]
    assert len(synthetic) == 18 * 8 and all(d.ImageType[0] == "DERIVED" for d in derived)
    # 1 s time points, references to source instances, same pixel geometry as the source
    temporal = sorted({int(d.TemporalPositionIdentifier) for d in derived})
    assert temporal == list(range(1, 26))
    source_uids = {s.SOPInstanceUID for s in source}
    for d in synthetic[:10]:
        assert {r.ReferencedSOPInstanceUID for r in d.SourceImageSequence} <= source_uids
    assert {tuple(d.PixelSpacing) for d in derived} == {tuple(first.PixelSpacing)}
    assert {(d.Rows, d.Columns) for d in derived} == {(first.Rows, first.Columns)}
    positions = {tuple(round(float(v), 3) for v in d.ImagePositionPatient) for d in derived}
    assert positions == {tuple(round(float(v), 3) for v in s.ImagePositionPatient) for s in source}
    # Acquired seconds (0, 4, 8, ...) reach the PACS bit for bit: same stored pixels as the source slice.
    source_pixels = {
        (round(float(src.AcquisitionTime or 0), 3), tuple(round(float(v), 3) for v in src.ImagePositionPatient)): p
        for src, p in zip(source, files)
    }
    first_volume = {k[1]: p for k, p in source_pixels.items() if k[0] == min(t for t, _ in source_pixels)}
    acquired_t0 = [d for d in derived if int(d.TemporalPositionIdentifier) == 1]
    assert len(acquired_t0) == 8
    for d in acquired_t0:
        assert "SECONDARY" not in d.ImageType
        original = pydicom.dcmread(first_volume[tuple(round(float(v), 3) for v in d.ImagePositionPatient)])
        np.testing.assert_array_equal(d.pixel_array, original.pixel_array)
    events = [e["event"] for e in receiver.audit.read()]
    assert events.count("received") == len(files) and events.count("sent") == 1


def test_echoscu_and_unknown_called_ae(tmp_path):
    echoscu = require("echoscu")
    settings = node_settings(tmp_path / "node", tmp_path / "unused.pt", None)
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    try:
        port = str(settings.dicom.port)
        assert run(echoscu, "-aec", "CTPNODE", "127.0.0.1", port).returncode == 0
        assert run(echoscu, "-aec", "SOMEONE", "127.0.0.1", port).returncode != 0
    finally:
        receiver.stop()


def test_serve_with_its_own_worker_process(tmp_path, orthanc):
    import os
    import signal

    from tests.integration.node_helpers import start_node_process, write_config
    from tests.peers import stop_process
    from tests.ports import wait_for_port

    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), orthanc.dicom_port)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    serve = start_node_process("serve", config, tmp_path / "serve.log", "--workers", "1")
    try:
        wait_for_port(settings.dicom.port, serve, "ctp-node serve")
        files = phantom_files(tmp_path / "study", duration_s=9)
        sent = run(require("storescu"), "-aec", "CTPNODE", "127.0.0.1", str(settings.dicom.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        store = JobStore(settings.database_url)
        wait_for(lambda: store.read.counts()["done"] == 1, timeout_s=180, what="the series done")
        assert len(orthanc.get("/series")) == 1
        workers = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("worker ")]
        assert workers, "the worker process did not start"
        pid = int(workers[0].split()[1].split(":")[1])
        os.kill(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
        assert serve.returncode == 0
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=30, what="the worker to stop with serve")
    finally:
        stop_process(serve)
