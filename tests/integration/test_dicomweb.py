"""DICOMweb destinations (ctp_node/node/work/stow_client.py) against a real Orthanc with its DICOMweb plugin
(Debian orthanc-dicomweb) on loopback, and against the node's own STOW-RS endpoint for the answers
Orthanc does not give (per-instance refusals, authentication)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi import FastAPI
from pydicom import dcmread
from pydicom.uid import MRImageStorage, generate_uid

from ctp_node.config import (
    Credential,
    Destination,
    DicomSettings,
    DicomwebAuth,
    DicomwebSettings,
    Settings,
    StorageSettings,
)
from ctp_node.errors import PeerError
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.work.stow_client import send_files_dicomweb
from ctp_node.web.stow import stow_router
from tests.node.dicom_helpers import ct_instance
from tests.peers import Orthanc, start_orthanc, wait_for
from tests.ports import free_port
from tests.uvicorn_server import served_by_uvicorn

pytestmark = pytest.mark.slow
TOKEN = "dicomweb-destination-token-0123"


def dicomweb_plugin() -> str:
    """The DICOMweb plugin's shared library, as the Debian package installed it."""
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not available to find the orthanc-dicomweb plugin")
    listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
    libraries = [line for line in listing.stdout.splitlines() if "OrthancDicomWeb" in line and ".so" in line]
    if listing.returncode != 0 or not libraries:
        pytest.skip("the Debian package orthanc-dicomweb is not installed; .ci/run installs it")
    return sorted(libraries, key=len)[0]


def orthanc_config() -> dict:
    return {"Name": "ctp-node-dicomweb", "DicomAet": "ORTHANC", "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    plugin = dicomweb_plugin()
    base = {
        "Name": "ctp-node-dicomweb-test",
        "DicomAet": "ORTHANC",
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    peer = start_orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), base=base, plugins=[plugin])
    try:
        wait_for(lambda: peer.get("/plugins") and "dicom-web" in peer.get("/plugins"), 20, "the DICOMweb plugin")
        yield peer
    finally:
        peer.stop()


def destination(url: str, **extra) -> Destination:
    return Destination(name="web-pacs", kind="dicomweb", url=url, timeout_s=10, **extra)


def series_files(folder: Path, count: int, **change) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"{i}.dcm"
        ds = ct_instance(path, study=study, series=series, value=i)
        if change:
            for keyword, value in change.items():
                setattr(ds, keyword, value)
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def test_results_arrive_in_orthanc_and_answer_qido(orthanc, tmp_path):
    study, files = series_files(tmp_path / "result", 5)
    progress = []
    results = send_files_dicomweb(
        files, destination(f"{orthanc.url}/dicom-web"), progress=lambda d, t: progress.append((d, t)), batch_bytes=3000
    )
    assert [r.path for r in results] == files and all(r.ok and r.status == 0 for r in results)
    assert progress[-1] == (5, 5) and len(progress) > 1  # several requests of at most 3000 bytes
    found = DICOMwebClient(url=f"{orthanc.url}/dicom-web").search_for_instances(study_instance_uid=study)
    assert len(found) == 5
    # Orthanc's own REST view: the instances, byte for byte the pixel data sent
    for path in files:
        sent = dcmread(path)
        ids = orthanc_find(orthanc, {"SOPInstanceUID": str(sent.SOPInstanceUID)})
        assert len(ids) == 1
        assert dcmread(io.BytesIO(orthanc.instance_file(ids[0]))).PixelData == sent.PixelData


def orthanc_find(orthanc: Orthanc, query: dict) -> list[str]:
    body = json.dumps({"Level": "Instance", "Query": query}).encode()
    request = urllib.request.Request(orthanc.url + "/tools/find", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_an_unreachable_service_is_a_transient_peer_error(tmp_path):
    _, files = series_files(tmp_path / "result", 1)
    with pytest.raises(PeerError, match="could not be reached") as raised:
        send_files_dicomweb(files, destination(f"http://127.0.0.1:{free_port()}/dicom-web"))
    assert isinstance(raised.value, ConnectionError)


def test_orthanc_stopped_mid_way_is_a_transient_peer_error(tmp_path):
    plugin = dicomweb_plugin()
    base = {
        "Name": "ctp-node-dicomweb-down",
        "DicomAet": "ORTHANC",
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    peer = start_orthanc(tmp_path / "orthanc", base=base, plugins=[plugin])
    _, files = series_files(tmp_path / "result", 2)
    try:
        wait_for(lambda: "dicom-web" in peer.get("/plugins"), 20, "the DICOMweb plugin")
        assert all(r.ok for r in send_files_dicomweb(files, destination(f"{peer.url}/dicom-web")))
    finally:
        peer.stop()
    with pytest.raises(PeerError):
        send_files_dicomweb(files, destination(f"{peer.url}/dicom-web"))


@contextlib.contextmanager
def node_stow(tmp_path: Path, token: str | None = None) -> Iterator[tuple[str, Receiver]]:
    """The node's own STOW-RS endpoint, served by uvicorn on a loopback port."""
    settings = Settings(
        storage=StorageSettings(data_dir=tmp_path / "node"),
        dicom=DicomSettings(bind_address="127.0.0.1", port=free_port()),
        dicomweb=DicomwebSettings(stow_enabled=True),
    )
    receiver = Receiver(settings, JobStore(settings.database_url))
    receiver.start()
    app = FastAPI()
    app.include_router(stow_router(receiver, token=token))
    try:
        with served_by_uvicorn(app) as url:
            yield f"{url}/dicomweb", receiver
    finally:
        receiver.stop()


def test_refused_instances_come_back_as_statuses_not_errors(tmp_path):
    _, good = series_files(tmp_path / "ct", 2)
    _, mr = series_files(tmp_path / "mr", 1, SOPClassUID=MRImageStorage)
    with node_stow(tmp_path) as (url, _):
        results = send_files_dicomweb(good + mr, destination(url))  # HTTP 202
        only_mr = send_files_dicomweb(mr, destination(url))  # HTTP 409, per-instance answer in the body
    assert [r.status for r in results] == [0, 0, 0x0122] and [r.ok for r in results] == [True, True, False]
    assert [r.status for r in only_mr] == [0x0122]


def test_bearer_authentication(tmp_path, monkeypatch):
    _, files = series_files(tmp_path / "ct", 1)
    monkeypatch.setenv("CTP_NODE_TEST_DICOMWEB_TOKEN", TOKEN)
    auth = DicomwebAuth(kind="bearer", secret=Credential(env="CTP_NODE_TEST_DICOMWEB_TOKEN"))
    with node_stow(tmp_path, token=TOKEN) as (url, receiver):
        with pytest.raises(PeerError, match="HTTP 401: check the destination's auth"):
            send_files_dicomweb(files, destination(url))
        assert all(r.ok for r in send_files_dicomweb(files, destination(url, auth=auth)))
        receiver.recorder.flush()
        assert receiver.spool.instances(next(receiver.spool.iter_series()))


def test_destination_kinds_keep_existing_configs_valid():
    assert Destination(name="pacs", host="10.0.0.5", port=104, ae_title="PACS").kind == "dimse"
    with pytest.raises(ValueError, match="needs url"):
        Destination(name="web", kind="dicomweb")
    with pytest.raises(ValueError, match="does not take url"):
        Destination(name="pacs", host="h", port=104, ae_title="PACS", url="http://x/dicom-web")
    with pytest.raises(ValueError, match="username is required"):
        DicomwebAuth(kind="basic", secret=Credential(env="X"))
