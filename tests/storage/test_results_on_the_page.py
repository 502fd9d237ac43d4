"""The status page shows a result in the object store as it shows a local one (issue 22): the output
series, the QA figures (served through the page's figure route), the records and the patient columns,
read from a real S3 server (SeaweedFS on loopback); headers by ranged GETs, never a whole series. A store
that does not answer leaves the page up (HTTP 200) with a note saying why; a figure is served only when
the result's listing holds it."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from ctp_node.config import ObjectStoreSettings, Settings
from ctp_node.node.shared.job_tables import series_table
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.object_results import ObjectResults
from ctp_node.node.shared.object_spool import ObjectSpool
from ctp_node.node.shared.object_store import ObjectStore
from ctp_node.node.shared.spool import SeriesKey, series_dir
from ctp_node.web import create_app
from ctp_node.web.auth import Authenticator
from tests.node.dicom_helpers import ct_instance
from tests.ports import free_port
from tests.storage.seaweed import BUCKET, object_store_settings
from tests.web.helpers import BEARER, DONE_SERIES, RECEIVING_SERIES, STUDY, _qa_figure, job_id, make_node

NOTE = "results in the object store could not be read: "
STORE_PATIENT, STORE_PATIENT_ID = "BUCKET^BETTY", "BKT0987654"  # masked: "B. B.", "•••654"
SYNTHETIC = "1s SYNTHETIC (from the bucket)"
CBF = "CBF synthetic (from the bucket)"
VOLUMES = {
    "synthetic 1 s": {"acquired_interval_s": 2.0, "mismatch_ratio": 1.9, "volumes": {
        "core": {"measured_ml": 23.4, "mirror_ml": 0.0, "reported": True, "withheld": None},
        "tmax6": {"measured_ml": 57.1, "mirror_ml": 0.0, "reported": False, "withheld": "noise above the limit"},
    }},
}  # fmt: skip
VERDICT = {
    "policy": "flag", "passed": True, "action": "none", "synthetic_seconds": 30, "noise_hu": 3.2,
    "summary": "pass: grey offset +0.20 HU (from the bucket)",
    "checks": [{"name": "grey", "value": 0.2, "tolerance": 1.0, "passed": True, "voxels": 77, "detail": ""}],
}  # fmt: skip


def result_folder(folder: Path, series_uid: str) -> Path:
    """A result as the processor writes one: a 1 s series of 3 large instances (512x512) at the top, a
    CBF map of 2 in perfusion/, a QA figure, the guardrail's verdict and the lesion volumes."""
    for i in range(3):
        path = folder / f"CTP1S_{i:04d}_000.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = ct_instance(path, study=STUDY, series=f"{series_uid}.1000", value=i)
        ds.PatientName, ds.PatientID, ds.StudyDate = STORE_PATIENT, STORE_PATIENT_ID, "20261201"
        ds.SeriesDescription, ds.SeriesNumber = SYNTHETIC, 1000
        ds.Rows = ds.Columns = 512
        ds.PixelData = bytes(512 * 512 * 2)  # 512 KiB: a whole GET of it would show
        ds.save_as(path, enforce_file_format=True)
    for i in range(2):
        path = folder / "perfusion" / "cbf_synthetic" / f"CBF_SYNTHETIC_{i:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = ct_instance(path, study=STUDY, series=f"{series_uid}.2001")
        ds.PatientName, ds.PatientID = STORE_PATIENT, STORE_PATIENT_ID
        ds.SeriesDescription, ds.SeriesNumber = CBF, 2001
        ds.save_as(path, enforce_file_format=True)
    _qa_figure(folder / "qa" / "curves.png")
    (folder / "volumes.json").write_text(json.dumps(VOLUMES))
    (folder / "guardrail.json").write_text(json.dumps(VERDICT))
    return folder


def with_store(settings: Settings, **object_store) -> Settings:
    storage = settings.storage.model_copy(update={"object_store": ObjectStoreSettings(**object_store)})
    return settings.model_copy(update={"storage": storage})


def record_result_dir(store: JobStore, job: int, result_dir: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(series_table).where(series_table.c.id == job).values(result_dir=result_dir))


def client_for(settings: Settings, store: JobStore) -> TestClient:
    return TestClient(create_app(settings, store, authenticator=Authenticator.from_settings(settings.web)))


def section(page: str, start: str, end: str = "</section>") -> str:
    found = re.search(re.escape(start) + ".*?" + re.escape(end), page, re.S)
    assert found, f"no {start!r} in the page"
    return found.group(0)


@pytest.fixture()
def node_with_a_result(tmp_path):
    """make_node's done job, its result replaced by ``result_folder``'s, its spooled files gone (as on a
    node with an object store, where no local folder holds the series)."""
    settings, store = make_node(tmp_path / "data")
    done = job_id(store, DONE_SERIES)
    local = result_folder(tmp_path / "result", DONE_SERIES)
    shutil.rmtree(store.get(done).result_dir)
    shutil.rmtree(series_dir(settings.storage.spool_dir, SeriesKey(STUDY, DONE_SERIES)))
    record_result_dir(store, done, str(local))
    return settings, store, done, local


def test_a_result_in_the_object_store_shows_as_a_local_one(node_with_a_result, s3, prefix, monkeypatch):
    settings, store, done, local = node_with_a_result
    with client_for(settings, store) as client:  # the local result: what the page must show of the stored one
        local_page = client.get(f"/jobs/{done}", headers=BEARER).text
    in_store = with_store(settings, **object_store_settings(s3, prefix=prefix))
    results = ObjectResults(ObjectStore(in_store.storage.object_store))
    uri = results.publish(local, STUDY, DONE_SERIES, store.get(done).generation, "a1")
    record_result_dir(store, done, uri)
    shutil.rmtree(local)

    reads: list[tuple[str, int | None]] = []  # every GET the page makes (the real one, recorded)
    real_read = ObjectResults.read

    def recorded(self, uri, relative, **limits):
        reads.append((relative, limits.get("first_bytes")))
        return real_read(self, uri, relative, **limits)

    monkeypatch.setattr(ObjectResults, "read", recorded)
    with client_for(in_store, store) as client:
        answer = client.get(f"/jobs/{done}", headers=BEARER)
        assert answer.status_code == 200
        page = answer.text
        # the output series: the same rows as the local result's (descriptions, counts, sizes, UIDs)
        outputs = section(page, '<table class="outputs">', "</table>")
        assert outputs == section(local_page, '<table class="outputs">', "</table>")
        assert SYNTHETIC in outputs and CBF in outputs and "perfusion/cbf_synthetic/CBF…" in outputs
        assert f"{DONE_SERIES}.1000" in outputs and f"{DONE_SERIES}.2001" in outputs
        assert "2 series, 5 instances" in page and f"in {uri}" in page
        # the records and the figure list, as for the local result
        for heading in ("<h2>Lesion volumes</h2>", "<h2>Guardrail</h2>", "<h2>QA figures</h2>"):
            assert section(page, heading) == section(local_page, heading)
        assert "23.4 mL" in page and "noise above the limit" in page and "57.1" not in page
        assert VERDICT["summary"] in page and f'src="/jobs/{done}/figures/qa/curves.png"' in page
        # the patient columns, from the stored result's first instance (masked)
        facts = section(page, '<table class="facts">', "</table>")
        assert facts == section(local_page, '<table class="facts">', "</table>")
        assert "B. B." in facts and "\u2022\u2022\u2022654" in facts and SYNTHETIC in facts
        assert NOTE not in page and "is not there any more" not in page
        # headers by ranged GETs of the first bytes only: never a whole instance, let alone a series
        dicom_reads = [(relative, first) for relative, first in reads if relative.endswith(".dcm")]
        assert dicom_reads and all(first is not None and first <= 1 << 20 for _, first in dicom_reads)
        assert len(dicom_reads) == 2  # one per output series; the patient's header is the 1 s series' one

        figure = client.get(f"/jobs/{done}/figures/qa/curves.png", headers=BEARER)
        assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
        key = uri[len(f"s3://{BUCKET}/") :] + "/qa/curves.png"
        assert figure.content == s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert figure.content.startswith(b"\x89PNG")

        reads.clear()  # a second look within the cache's time: no more GETs of the headers or records
        assert client.get(f"/jobs/{done}", headers=BEARER).status_code == 200
        assert reads == []
        listing = client.get("/", headers=BEARER).text  # the job list reads nothing from the store
        assert reads == [] and "B. B." in listing  # (the job's page read its header)


def test_a_store_that_stopped_answering_leaves_the_page_up_with_a_note(node_with_a_result, s3, prefix, caplog):
    settings, store, done, local = node_with_a_result
    in_store = with_store(settings, **object_store_settings(s3, prefix=prefix))
    uri = ObjectResults(ObjectStore(in_store.storage.object_store)).publish(local, STUDY, DONE_SERIES, 1, "a1")
    record_result_dir(store, done, uri)
    s3.stop()  # the s3 fixture starts it again for the next test
    caplog.set_level(logging.WARNING, logger="ctp_node.web.jobview")
    with client_for(in_store, store) as client:
        answer = client.get(f"/jobs/{done}", headers={**BEARER, "Accept": "text/html"})
        assert answer.status_code == 200
        note = section(answer.text, '<pre class="warning" id="store-error">', "</pre>")
        assert NOTE in note and s3.endpoint in note and f"LIST {prefix}results/" in note
        assert "Not shown: the object store could not be read" in answer.text
        assert "The results folder" not in answer.text
        assert f"Job {done}" in answer.text and "<h2>Audit trail</h2>" in answer.text  # the rest of the page
        figure = client.get(f"/jobs/{done}/figures/qa/curves.png", headers=BEARER)
        assert figure.status_code == 503 and NOTE in figure.json()["detail"]
    assert any(NOTE in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_an_unreachable_store_leaves_the_page_up_with_a_note(node_with_a_result, endpoint, caplog, monkeypatch):
    """Nothing listening (connection refused), or a listener that never answers (timeouts): the page
    is answered within the page's own timeout, not the store's."""
    settings, store, done, _ = node_with_a_result
    monkeypatch.setenv("CTP_NODE_TEST_S3_KEY", "ctp-node-test")
    monkeypatch.setenv("CTP_NODE_TEST_S3_SECRET", "ctp-node-test-secret")
    listener = socket.socket()
    try:
        if endpoint == "silent":  # accepts connections (the backlog) and never answers
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            port = listener.getsockname()[1]
        else:
            port = free_port()
        in_store = with_store(
            settings, endpoint=f"http://127.0.0.1:{port}", bucket=BUCKET, timeout_s=60,
            access_key_id={"env": "CTP_NODE_TEST_S3_KEY"}, secret_access_key={"env": "CTP_NODE_TEST_S3_SECRET"},
        )  # fmt: skip
        record_result_dir(store, done, f"s3://{BUCKET}/results/{STUDY}/{DONE_SERIES}/g1/a1")
        caplog.set_level(logging.WARNING, logger="ctp_node.web.jobview")
        with client_for(in_store, store) as client:
            started = time.monotonic()
            answer = client.get(f"/jobs/{done}", headers={**BEARER, "Accept": "text/html"})
            took = time.monotonic() - started
    finally:
        listener.close()
    assert answer.status_code == 200 and NOTE in answer.text and f"127.0.0.1:{port}" in answer.text
    assert took < 30, f"the page waited {took:.0f} s for the store"
    assert any(NOTE in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


OUTSIDE_THE_LISTING = [
    "volumes.json",  # in the result, not a figure
    "CTP1S_0000_000.dcm",
    "qa/other.png",  # not in the listing
    "qa/../volumes.json",
    "..%2F..%2Fa2%2Fqa%2Fcurves.png",  # another attempt's figure
    "%2E%2E/a2/qa/curves.png",
    f"..%2F..%2F..%2F..%2F..%2Fspool%2F{STUDY}",
]


def test_only_figures_the_results_listing_holds_are_served(node_with_a_result, s3, prefix):
    settings, store, done, local = node_with_a_result
    in_store = with_store(settings, **object_store_settings(s3, prefix=prefix))
    results = ObjectResults(ObjectStore(in_store.storage.object_store))
    generation = store.get(done).generation
    uri = results.publish(local, STUDY, DONE_SERIES, generation, "a1")
    results.publish(local, STUDY, DONE_SERIES, generation, "a2")  # another attempt's keys beside it
    record_result_dir(store, done, uri)
    with client_for(in_store, store) as client:
        assert client.get(f"/jobs/{done}/figures/qa/curves.png", headers=BEARER).status_code == 200
        for name in OUTSIDE_THE_LISTING:
            answer = client.get(f"/jobs/{done}/figures/{name}", headers=BEARER)
            assert answer.status_code == 404, (name, answer.text)
            assert b"PNG" not in answer.content and b"synthetic 1 s" not in answer.content


def test_a_job_without_a_result_shows_its_patient_from_the_buckets_spool(tmp_path, s3, prefix):
    """A job still receiving (no result yet) on a node whose spool is the bucket: the page reads the
    patient columns from its first spooled instance (one ranged GET), as it reads them from a local spool."""
    settings, store = make_node(tmp_path / "data")
    receiving = job_id(store, RECEIVING_SERIES)
    shutil.rmtree(series_dir(settings.storage.spool_dir, SeriesKey(STUDY, RECEIVING_SERIES)))  # no local copy
    in_store = with_store(settings, **object_store_settings(s3, prefix=prefix))
    with client_for(in_store, store) as client:
        before = section(client.get(f"/jobs/{receiving}", headers=BEARER).text, '<table class="facts"', "</table>")
    assert "B. B." not in before  # nothing in the bucket yet: the page shows the job without them

    path = tmp_path / "spooled.dcm"
    ds = ct_instance(path, study=STUDY, series=RECEIVING_SERIES)
    ds.PatientName, ds.PatientID = STORE_PATIENT, STORE_PATIENT_ID
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(512 * 512 * 2)
    ds.save_as(path, enforce_file_format=True)
    spool = ObjectSpool(tmp_path / "incoming", ObjectStore(in_store.storage.object_store))
    spool.write(SeriesKey(STUDY, RECEIVING_SERIES), ds.SOPInstanceUID, path.read_bytes())
    with client_for(in_store, store) as client:
        page = client.get(f"/jobs/{receiving}", headers=BEARER)
    assert page.status_code == 200
    facts = section(page.text, '<table class="facts"', "</table>")
    assert "B. B." in facts and "\u2022\u2022\u2022654" in facts, facts
