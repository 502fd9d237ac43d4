"""Every perfusion output type is accepted and stored by a real PACS (Orthanc), each as its own series."""

from __future__ import annotations

import pydicom
import pytest

from ctp_node.node.shared.peer import Peer
from ctp_node.node.work.scu import send_files
from ctp_node.series.outputs import write_perfusion_outputs
from tests.peers import start_orthanc
from tests.series.outputs_cases import make_input, write_reference_files


@pytest.fixture
def orthanc(tmp_path):
    server = start_orthanc(tmp_path / "orthanc", ae_title="OUTPUTSPACS")
    yield server
    server.stop()


def test_orthanc_stores_every_output_series(orthanc, tmp_path):
    reference_files = write_reference_files(tmp_path / "reference")
    written = write_perfusion_outputs(make_input(reference_files), tmp_path / "perfusion")
    paths = [path for series in written for path in series.paths]
    results = send_files(paths, Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title), "CTPNODE")
    assert all(r.ok for r in results), [(r.path.name, r.status) for r in results if not r.ok]

    stored = {}
    for series_id in orthanc.get("/series"):
        info = orthanc.get(f"/series/{series_id}")
        stored[info["MainDicomTags"]["SeriesInstanceUID"]] = info
    assert set(stored) == {s.series_uid for s in written}
    for series in written:
        info = stored[series.series_uid]
        assert len(info["Instances"]) == series.count, series.name
        assert info["MainDicomTags"]["SeriesDescription"] == series.series_description
        instance = orthanc.get(f"/instances/{info['Instances'][0]}/simplified-tags")
        assert instance["SOPClassUID"] == str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).SOPClassUID)
    modalities = {stored[s.series_uid]["MainDicomTags"].get("Modality") for s in written}
    assert modalities == {"CT", "OT", "SR", "SEG"}
