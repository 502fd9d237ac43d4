"""Pull a series from a PACS with C-GET into the spool (for `ctp-node reprocess --from-pacs`).

C-GET brings the instances back over the same association, so the PACS needs no route to this
node (unlike C-MOVE); the PACS must allow C-GET for this node's AE title (Orthanc:
``DicomModalities`` entry with ``AllowGet``, or ``DicomAlwaysAllowGet``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from ctp_node.errors import PeerError
from ctp_node.node.receive.ingest import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from ctp_node.node.shared.dicom_status import (
    RETRIEVED,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from ctp_node.node.shared.object_store import StoreUnavailable
from ctp_node.node.shared.peer import Peer
from ctp_node.node.shared.spool import SeriesKey, check_uid
from ctp_node.node.shared.storage import AnySpool

log = logging.getLogger(__name__)


@dataclass
class Retrieved:
    key: SeriesKey
    paths: list[Path | str] = field(default_factory=list)  # files, or s3:// addresses (object store)
    failed: int = 0
    status: int | None = None


def retrieve_series(peer: Peer, study_uid: str, series_uid: str, spool: AnySpool, calling_ae: str) -> Retrieved:
    """C-GET one series into the spool.

    InvalidUIDError for a UID that is not one (before any network traffic); PeerError (a
    ConnectionError) if the PACS cannot be reached, refuses, or sends nothing of the series."""
    key = SeriesKey(check_uid(study_uid, "StudyInstanceUID"), check_uid(series_uid, "SeriesInstanceUID"))
    result = Retrieved(key)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        if str(ds.get("SeriesInstanceUID", "")) != key.series_uid:
            return STATUS_CANNOT_UNDERSTAND  # not the series asked for: refuse rather than mix series
        try:
            stored = spool.write(
                key,
                check_uid(event.request.AffectedSOPInstanceUID, "SOPInstanceUID"),
                event.encoded_dataset(include_meta=True),
            )
        except StoreUnavailable as exc:  # the object store did not confirm it: the PACS hears so
            log.error("C-GET of %s: %s", key.series_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        result.paths.append(stored)
        return STATUS_SUCCESS

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    if not assoc.is_established:
        raise PeerError(f"no association with {peer.ae_title} at {peer.host}:{peer.port} for C-GET")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = key.study_uid
    query.SeriesInstanceUID = key.series_uid
    try:
        for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and "Status" in status:
                result.status = int(status.Status)
                result.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    finally:
        assoc.release()
    if result.status is None or (result.status not in RETRIEVED and not result.paths):
        raise PeerError(
            f"C-GET of series {key.series_uid} from {peer.ae_title} failed (status "
            f"{hex(result.status) if result.status is not None else 'none'}): is the series there, and does the "
            "PACS allow C-GET for this AE title?"
        )
    log.info("retrieved %d instances of %s from %s", len(result.paths), key.series_uid, peer.ae_title)
    return result
