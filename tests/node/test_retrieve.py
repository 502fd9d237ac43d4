"""retrieve_series (C-GET into the spool) against real peers: Orthanc, and a PACS that sends the wrong series."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from ctp_node.node.receive.retrieve import retrieve_series
from ctp_node.node.shared.peer import Peer
from ctp_node.node.shared.spool import InvalidUIDError, SeriesKey, Spool
from tests.node.dicom_helpers import ct_instance
from tests.peers import start_orthanc
from tests.ports import free_port

STUDY = "1.2.826.0.1.3680043.10.2"
WANTED, OTHER = f"{STUDY}.1", f"{STUDY}.2"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding two series of one study (3 and 2 instances), allowing C-GET for CTPNODE."""
    folder = tmp_path_factory.mktemp("retrieve")
    modalities = {"ctpnode": {"AET": "CTPNODE", "Host": "127.0.0.1", "Port": free_port(), "AllowGet": True}}
    orthanc = start_orthanc(folder / "orthanc", modalities=modalities)
    sent = {}
    for series, count in ((WANTED, 3), (OTHER, 2)):
        for i in range(count):
            path = folder / f"{series}-{i}.dcm"
            ds = ct_instance(path, study=STUDY, series=series, value=10 * i)
            orthanc.upload(path)
            sent[ds.SOPInstanceUID] = ds
    yield Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title), sent
    orthanc.stop()


def test_pulls_exactly_the_series_asked_for_into_the_spool(pacs, tmp_path):
    peer, sent = pacs
    spool = Spool(tmp_path / "spool")
    got = retrieve_series(peer, STUDY, WANTED, spool, "CTPNODE")
    assert got.key == SeriesKey(STUDY, WANTED) and got.failed == 0 and got.status == 0x0000
    assert sorted(got.paths) == spool.instances(got.key) and len(got.paths) == 3
    for path in got.paths:
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm" and ds.SeriesInstanceUID == WANTED
        assert ds.PixelData == sent[ds.SOPInstanceUID].PixelData, "stored as sent, pixel for pixel"
    assert not spool.instances(SeriesKey(STUDY, OTHER))


def test_a_series_the_pacs_does_not_hold_is_an_error_and_spools_nothing(pacs, tmp_path):
    peer, _ = pacs
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ConnectionError, match="C-GET of series 1.2.3.999"):
        retrieve_series(peer, STUDY, "1.2.3.999", spool, "CTPNODE")
    assert not list(spool.iter_series())


def test_an_unknown_calling_ae_title_is_refused_with_what_to_check(pacs, tmp_path):
    peer, _ = pacs
    with pytest.raises(ConnectionError, match="allow C-GET for this AE title"):
        retrieve_series(peer, STUDY, WANTED, Spool(tmp_path / "spool"), "STRANGER")


def test_bad_uids_and_unreachable_peers_fail_before_anything_is_written(tmp_path):
    spool = Spool(tmp_path / "spool")
    nobody = Peer("127.0.0.1", free_port(), "PACS")
    with pytest.raises(InvalidUIDError, match="SeriesInstanceUID"):
        retrieve_series(nobody, STUDY, "../../etc", spool, "CTPNODE")
    with pytest.raises(ConnectionError, match="no association"):
        retrieve_series(nobody, STUDY, WANTED, spool, "CTPNODE")
    assert not list(spool.iter_series())


@pytest.mark.parametrize("sends", [WANTED, OTHER])
def test_instances_of_another_series_are_refused_not_mixed_in(tmp_path, sends):
    """A PACS answering C-GET with one instance of ``sends``: kept when it is the series asked for,
    refused (and the retrieve an error) when it belongs to another."""
    instance = ct_instance(tmp_path / "instance.dcm", study=STUDY, series=sends)

    def on_get(event):
        yield 1  # one sub-operation
        yield 0xFF00, instance  # Pending, with the instance

    ae = AE(ae_title="GETPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)])
    spool, peer = Spool(tmp_path / "spool"), Peer("127.0.0.1", port, "GETPACS")
    try:
        if sends == WANTED:
            got = retrieve_series(peer, STUDY, WANTED, spool, "CTPNODE")
            assert [p.name for p in got.paths] == [f"{instance.SOPInstanceUID}.dcm"]
        else:
            with pytest.raises(ConnectionError, match=f"C-GET of series {WANTED} from GETPACS failed"):
                retrieve_series(peer, STUDY, WANTED, spool, "CTPNODE")
            assert not list(spool.iter_series())
    finally:
        server.shutdown()
