"""STOW-RS into the node (ctp_node/web/stow.py): the C-STORE checks, spool and job store, over HTTP.

The router is mounted on a minimal FastAPI app over a started Receiver (its SCP on a loopback port,
its job store in SQLite); one test serves it with uvicorn and stores with dicomweb-client.
"""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path

import pydicom
import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.uid import MRImageStorage, generate_uid

from ctp_node.config import DicomSettings, DicomwebSettings, Settings, StorageSettings
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore
from ctp_node.web.stow import STOW_CALLING_AE, stow_router
from tests.node.dicom_helpers import ct_instance
from tests.peers import wait_for
from tests.ports import free_port
from tests.uvicorn_server import served_by_uvicorn

TOKEN = "stow-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "ctp-node-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(*parts: bytes, part_type: str = "application/dicom", close: bool = True) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def instance_bytes(tmp_path: Path, study: str, series: str, **change) -> tuple[bytes, pydicom.Dataset]:
    """A CT instance as a Part 10 file; ``change``: dataset attributes set after the file meta was made."""
    path = tmp_path / f"{generate_uid()}.dcm"
    ds = ct_instance(path, study=study, series=series)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    return part10(ds), ds


def part10(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a Part 10 file with its file meta as it stands (pydicom would otherwise update it)."""
    ds.preamble = bytes(128)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def make_settings(tmp_path: Path, **dicomweb) -> Settings:
    return Settings(
        storage=StorageSettings(data_dir=tmp_path / "data"),
        dicom=DicomSettings(bind_address="127.0.0.1", port=free_port(), network_timeout_s=2, max_associations=1),
        dicomweb=DicomwebSettings(stow_enabled=True, **dicomweb),
    )


@pytest.fixture()
def receiver(tmp_path):
    settings = make_settings(tmp_path)
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture()
def client(receiver):
    app = FastAPI()
    app.include_router(stow_router(receiver, token=TOKEN))
    return TestClient(app)


def post(client: TestClient, body: bytes, path: str = "/dicomweb/studies", **headers) -> requests.Response:
    return client.post(path, content=body, headers={"Content-Type": CONTENT_TYPE, **AUTH, **headers})


def answer(response) -> pydicom.Dataset:
    assert response.headers["content-type"] == "application/dicom+json"
    return pydicom.Dataset.from_json(response.json())


def metric(receiver: Receiver, name: str, **labels) -> float:
    return receiver.metrics.registry.get_sample_value(name, labels) or 0.0


def test_instances_land_in_the_spool_and_the_job_store(receiver, client, tmp_path):
    study, series = generate_uid(), generate_uid()
    sent = [instance_bytes(tmp_path, study, series) for _ in range(3)]
    response = post(client, multipart(*(data for data, _ in sent)))
    assert response.status_code == 200, response.text
    stored = answer(response).ReferencedSOPSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in stored) == sorted(ds.SOPInstanceUID for _, ds in sent)
    assert "FailedSOPSequence" not in answer(response)
    for data, ds in sent:  # byte for byte what was sent, under the C-STORE path's layout
        assert (receiver.spool.root / study / series / f"{ds.SOPInstanceUID}.dcm").read_bytes() == data
    receiver.recorder.flush()
    job = receiver.store.find(series)
    assert job is not None and job.instances == 3 and job.calling_ae == STOW_CALLING_AE
    assert metric(receiver, "ctp_node_received_instances_total", calling_ae=STOW_CALLING_AE) == 3
    # the same instance again is the same instance (counted once), as with a C-STORE resend
    assert post(client, multipart(sent[0][0])).status_code == 200
    receiver.recorder.flush()
    assert receiver.store.find(series).instances == 3


def test_refused_parts_are_listed_with_their_reason_and_counted(receiver, client, tmp_path):
    study, series = generate_uid(), generate_uid()
    good, good_ds = instance_bytes(tmp_path, study, series)
    mismatch, mismatch_ds = instance_bytes(tmp_path, study, series, SOPInstanceUID=generate_uid())
    mr, mr_ds = instance_bytes(tmp_path, study, series)
    mr_ds.SOPClassUID = mr_ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    before = metric(receiver, "ctp_node_refused_instances_total", reason="uid_mismatch")
    response = post(client, multipart(good, mismatch, part10(mr_ds)))
    assert response.status_code == 202, response.text
    result = answer(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [good_ds.SOPInstanceUID]
    reasons = {i.ReferencedSOPInstanceUID: i.FailureReason for i in result.FailedSOPSequence}
    assert reasons == {mismatch_ds.SOPInstanceUID: 0xC000, mr_ds.SOPInstanceUID: 0x0122}
    warnings = response.headers.get_list("warning")
    assert any("differs from MediaStorageSOPInstanceUID" in w for w in warnings), warnings
    assert any("is not CT or Enhanced CT" in w for w in warnings), warnings
    assert metric(receiver, "ctp_node_refused_instances_total", reason="uid_mismatch") == before + 1
    assert metric(receiver, "ctp_node_refused_instances_total", reason="sop_class") == 1
    assert not (receiver.spool.root / study / series / f"{mismatch_ds.SOPInstanceUID}.dcm").exists()


def test_nothing_stored_is_a_conflict(receiver, client, tmp_path):
    study = generate_uid()
    other, other_ds = instance_bytes(tmp_path, generate_uid(), generate_uid())
    response = post(client, multipart(other), path=f"/dicomweb/studies/{study}")
    assert response.status_code == 409
    assert answer(response).FailedSOPSequence[0].ReferencedSOPInstanceUID == other_ds.SOPInstanceUID
    assert f"is not the study {study}" in response.headers["warning"]
    assert metric(receiver, "ctp_node_refused_instances_total", reason="study_mismatch") == 1
    right, _ = instance_bytes(tmp_path, study, generate_uid())
    assert post(client, multipart(right), path=f"/dicomweb/studies/{study}").status_code == 200


def test_a_transfer_syntax_the_node_cannot_read_is_0xC122(client, tmp_path):
    data, ds = instance_bytes(tmp_path, generate_uid(), generate_uid())
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not for CT
    ds.PixelData = encapsulate([ds.PixelData])
    response = post(client, multipart(part10(ds)))
    assert response.status_code == 409
    assert answer(response).FailedSOPSequence[0].FailureReason == 0xC122


def test_parts_that_are_not_dicom_files(receiver, client, tmp_path):
    response = post(client, multipart(b"not a DICOM file at all" * 10))
    assert response.status_code == 409
    assert answer(response).OtherFailuresSequence[0].FailureReason == 0xC000
    assert "not a DICOM Part 10 file" in response.headers["warning"]
    assert metric(receiver, "ctp_node_refused_instances_total", reason="unreadable") == 1
    good, _ = instance_bytes(tmp_path, generate_uid(), generate_uid())
    response = post(client, multipart(good, b"{}", part_type="application/json"))
    assert response.status_code == 409  # the declared type is wrong for the part holding the DICOM file too
    assert "only application/dicom" in response.headers["warning"]


def test_out_of_resources_is_503_with_retry_after(receiver, client, tmp_path):
    study = generate_uid()
    (receiver.spool.root / study).write_bytes(b"")  # where the study's folder must go: the write fails
    data, _ = instance_bytes(tmp_path, study, generate_uid())
    response = post(client, multipart(data))
    assert response.status_code == 503 and response.headers["retry-after"].isdigit()
    assert answer(response).FailedSOPSequence[0].FailureReason == 0xA700
    assert "node cannot store" in response.headers["warning"]
    assert metric(receiver, "ctp_node_refused_instances_total", reason="disk") == 1


def test_malformed_and_truncated_bodies(receiver, client, tmp_path):
    study, series = generate_uid(), generate_uid()
    first, first_ds = instance_bytes(tmp_path, study, series)
    second, _ = instance_bytes(tmp_path, study, series)
    # cut inside the second part: the first, complete part is stored, the rest reported
    body = multipart(first, second, close=False)[: -len(second) // 2]
    response = post(client, body)
    assert response.status_code == 202
    result = answer(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [first_ds.SOPInstanceUID]
    assert "closing boundary" in response.headers["warning"]
    assert post(client, b"no boundary in here").status_code == 400
    assert post(client, b"").status_code == 400


def test_request_level_refusals(client, tmp_path):
    data, _ = instance_bytes(tmp_path, generate_uid(), generate_uid())
    body = multipart(data)
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE}).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert (
        client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE, **wrong}).status_code
        == 401
    )
    assert post(client, body, **{"Content-Type": "application/dicom"}).status_code == 415
    xml = f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}'
    assert post(client, body, **{"Content-Type": xml}).status_code == 415
    assert post(client, body, **{"Content-Type": 'multipart/related; type="application/dicom"'}).status_code == 400
    assert post(client, body, path="/dicomweb/studies/1.02.x").status_code == 400
    assert post(client, body, Accept="application/dicom+xml").status_code == 406


def test_the_body_size_limit(tmp_path):
    settings = make_settings(tmp_path, max_request_bytes=1 << 20)
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    try:
        app = FastAPI()
        app.include_router(stow_router(receiver))
        client = TestClient(app)
        big = multipart(b"\0" * (1 << 20))
        assert client.post("/dicomweb/studies", content=big, headers={"Content-Type": CONTENT_TYPE}).status_code == 413

        def chunks():  # no Content-Length: the limit holds on what arrives
            for _ in range(4):
                yield b"\0" * (1 << 19)

        response = client.post("/dicomweb/studies", content=chunks(), headers={"Content-Type": CONTENT_TYPE})
        assert response.status_code == 413
        assert not any(receiver.spool.root.iterdir())
    finally:
        receiver.stop()


@pytest.fixture()
def served(receiver):
    """The router served by uvicorn on a loopback port."""
    app = FastAPI()
    app.include_router(stow_router(receiver, token=TOKEN))
    with served_by_uvicorn(app) as url:
        yield url


def test_dicomweb_client_stores_over_http(receiver, served, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    study, series = generate_uid(), generate_uid()
    datasets = [instance_bytes(tmp_path, study, series)[1] for _ in range(4)]
    client = DICOMwebClient(url=f"{served}/dicomweb", headers=AUTH)
    result = client.store_instances(datasets)
    assert sorted(i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence) == sorted(
        ds.SOPInstanceUID for ds in datasets
    )
    receiver.recorder.flush()
    assert receiver.store.find(series).instances == 4
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances(datasets, study_instance_uid=generate_uid())
    assert refused.value.response.status_code == 409
    anonymous = DICOMwebClient(url=f"{served}/dicomweb")
    with pytest.raises(requests.HTTPError) as unauthorized:
        anonymous.store_instances(datasets)
    assert unauthorized.value.response.status_code == 401


def _read_response(sock: socket.socket) -> str:
    """One whole HTTP response: headers and body can arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_stalled_body_is_dropped_and_a_second_request_meanwhile_is_busy(served, tmp_path):
    port = int(served.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(
            (
                f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY}\r\n"
            ).encode()
        )

        def refused_busy() -> tuple[requests.Response] | None:
            # Until the server has taken the stalled request's slot (max_associations = 1) this one is
            # stored (200) and asked again, with a new instance; once the slot is held it is refused.
            # (A tuple: a Response is falsy when its status is an error.)
            data, _ = instance_bytes(tmp_path, generate_uid(), generate_uid())
            reply = requests.post(
                f"{served}/dicomweb/studies", data=multipart(data), headers={"Content-Type": CONTENT_TYPE, **AUTH}
            )
            assert reply.status_code in (200, 503), reply.text
            return (reply,) if reply.status_code == 503 else None

        (busy,) = wait_for(refused_busy, 10, "the stalled request to hold the slot")
        assert busy.headers["retry-after"].isdigit()
        stalled.settimeout(30)
        reply = _read_response(stalled)
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert "stalled" in json.loads(reply.split("\r\n\r\n", 1)[1])["detail"]
    data, _ = instance_bytes(tmp_path, generate_uid(), generate_uid())
    after = requests.post(
        f"{served}/dicomweb/studies", data=multipart(data), headers={"Content-Type": CONTENT_TYPE, **AUTH}
    )
    assert after.status_code == 200  # the slot was given back


def test_a_part_over_max_instance_bytes_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    """Issue 23 item 3: a 300 MB part cost +303 MB; a part over dicom.max_instance_bytes is now refused
    (0xC000, named when its header is readable, counted as too_large) and never read into memory."""
    from ctp_node.web import stow

    settings = make_settings(tmp_path)
    settings = settings.model_copy(update={"dicom": settings.dicom.model_copy(update={"max_instance_bytes": 1 << 20})})
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    read_whole: list[int] = []
    store = stow._PartStore._store
    monkeypatch.setattr(stow._PartStore, "_store", lambda self, data: (read_whole.append(len(data)), store(self, data)))
    try:
        app = FastAPI()
        app.include_router(stow_router(receiver, token=TOKEN))
        study, series = generate_uid(), generate_uid()
        small, small_ds = instance_bytes(tmp_path, study, series)
        big_ds = ct_instance(tmp_path / "big.dcm", study=study, series=series)
        big_ds.Rows = big_ds.Columns = 1024
        big_ds.PixelData = bytes(2 << 20)  # 2 MiB of pixels
        response = post(TestClient(app), multipart(small, part10(big_ds)))
        assert response.status_code == 202, response.text
        result = answer(response)
        assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [small_ds.SOPInstanceUID]
        assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in result.FailedSOPSequence] == [
            (big_ds.SOPInstanceUID, 0xC000)
        ]
        assert any("max_instance_bytes" in w for w in response.headers.get_list("warning"))
        assert metric(receiver, "ctp_node_refused_instances_total", reason="too_large") == 1
        assert max(read_whole) < 1 << 20  # only the small part was read
        assert not (receiver.spool.root / study / series / f"{big_ds.SOPInstanceUID}.dcm").exists()
    finally:
        receiver.stop()
