"""Accepting one received instance, whichever protocol brought it: C-STORE (``scp``) or STOW-RS
(``ctp_node.web.stow``). Both get the same checks, the same durable spool write, the same hand-off
to the job store and the same refusals, counted in ``ctp_node_refused_instances{reason}``.

Checks, in order: the header is readable; the SOP Instance and Class UIDs are present and valid;
they equal what the sender stated outside the dataset (the C-STORE command's Affected UIDs, or a
STOW-RS part's Part 10 file meta), since the spool names the file after one and the worker reads the
other; the SOP class is CT or Enhanced CT; for STOW-RS on ``/studies/{uid}``, the study is that one.
Then the instance is written durably to the spool (fsync'd, or with an object store confirmed by its
PUT, before anyone hears Success) and handed to ``on_stored`` (the job store's queue). Before any of
it, the node's resources are asked (``ctp_node.node.shared.health``): with the disk below its floor or
the job store or object store down, the instance is refused 0xA700 at once (back-pressure). Each
failure is a :class:`Refusal` carrying the DIMSE status, a short reason label for the metric and a
comment saying what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage

from ctp_node.node.shared.completeness import InstanceFacts, facts_from_header
from ctp_node.node.shared.dicom_status import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES
from ctp_node.node.shared.health import OBJECT_STORE, ResourceHealth
from ctp_node.node.shared.object_store import StoreUnavailable
from ctp_node.node.shared.spool import InvalidUIDError, SeriesKey, check_uid
from ctp_node.node.shared.storage import AnySpool

log = logging.getLogger(__name__)

# Uncompressed and the compressed syntaxes scanners use for CT (pynetdicom's defaults offer only the
# uncompressed ones, so a JPEG Lossless sender would fail to negotiate).
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
STORAGE_SOP_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the spool now holds, as plain data for the job store and the audit log."""

    key: SeriesKey
    sop_uid: str
    sop_class_uid: str
    path: Path | str  # the spooled file, or its s3:// address (``ObjectSpool``)
    calling_ae: str
    calling_host: str
    modality: str
    received_at: datetime
    facts: InstanceFacts | None = None  # for the completeness check; None: read them from the file


OnStored = Callable[[ReceivedInstance], None]
OnRefused = Callable[[str], None]  # the reason label of ctp_node_refused_instances


class Refusal(Exception):
    """An instance answered with a failure: the status, a short reason label (for the metric) and why."""

    def __init__(self, status: int, reason: str, comment: str) -> None:
        super().__init__(comment)
        self.status, self.reason, self.comment = status, reason, comment


@dataclass(frozen=True)
class Claim:
    """The SOP Instance and Class UIDs the sender stated outside the dataset, and under which names."""

    instance_uid: object
    class_uid: object
    instance_name: str
    class_name: str

    @classmethod
    def from_command(cls, request: object) -> Claim:
        """A C-STORE request's Affected SOP Instance / Class UIDs."""
        return cls(
            getattr(request, "AffectedSOPInstanceUID", None),
            getattr(request, "AffectedSOPClassUID", None),
            "AffectedSOPInstanceUID",
            "AffectedSOPClassUID",
        )

    @classmethod
    def from_file_meta(cls, meta: Dataset | None) -> Claim:
        """A Part 10 file's Media Storage SOP Instance / Class UIDs."""
        meta = meta if meta is not None else Dataset()
        return cls(
            meta.get("MediaStorageSOPInstanceUID"),
            meta.get("MediaStorageSOPClassUID"),
            "MediaStorageSOPInstanceUID",
            "MediaStorageSOPClassUID",
        )


@dataclass(frozen=True)
class Origin:
    """Who sent it: the calling AE title (or the web endpoint's label) and the host."""

    calling_ae: str
    host: str


def check_identity(header: Dataset, claim: Claim, study_uid: str | None = None) -> tuple[SeriesKey, str, str]:
    """The series key, SOP Instance UID and SOP Class UID of a header, or Refusal saying what is wrong.

    The spool names the file after the claimed SOP Instance UID and the worker reads the dataset's:
    they must be the same valid UID, or a resend could overwrite another instance and the worker would
    meet an instance it cannot place.
    """
    try:
        sop_uid = header.get("SOPInstanceUID")
        sop_class = header.get("SOPClassUID")
    except Exception as exc:  # a deferred element pydicom cannot parse
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "unreadable", f"unreadable dataset: {exc}") from exc
    for value, name in ((sop_uid, "SOPInstanceUID"), (sop_class, "SOPClassUID")):
        if value is None or not str(value).strip("\x00 "):
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "missing_uid", f"dataset has no {name}")
    try:
        key = SeriesKey(
            check_uid(header.get("StudyInstanceUID"), "StudyInstanceUID"),
            check_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        )
        sop_uid = check_uid(sop_uid, "SOPInstanceUID")
        sop_class = check_uid(sop_class, "SOPClassUID")
        claimed_uid = check_uid(claim.instance_uid, claim.instance_name)
        claimed_class = check_uid(claim.class_uid, claim.class_name)
    except InvalidUIDError as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "invalid_uid", str(exc)) from exc
    if sop_uid != claimed_uid:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "uid_mismatch", f"SOPInstanceUID differs from {claim.instance_name}")
    if sop_class != claimed_class:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "uid_mismatch", f"SOPClassUID differs from {claim.class_name}")
    if sop_class not in STORAGE_SOP_CLASSES:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "sop_class", f"SOPClassUID {sop_class} is not CT or Enhanced CT")
    if study_uid is not None and key.study_uid != study_uid:
        raise Refusal(
            STATUS_CANNOT_UNDERSTAND, "study_mismatch", f"StudyInstanceUID {key.study_uid} is not the study {study_uid}"
        )
    return key, sop_uid, sop_class


def accept_instance(
    read_header: Callable[[], Dataset],
    claim: Claim,
    encoded: Callable[[], bytes | Sequence[bytes | memoryview] | Path],
    origin: Origin,
    spool: AnySpool,
    on_stored: OnStored,
    on_refused: OnRefused | None = None,
    *,
    study_uid: str | None = None,
    health: ResourceHealth | None = None,
) -> ReceivedInstance:
    """Check, store durably and hand on one instance; Refusal (already logged and counted) if not.

    ``read_header`` gives the elements up to NumberOfFrames (identity, series, the completeness
    facts), or raises (a Refusal as it is, anything else as "unreadable"); ``encoded`` gives the
    Part 10 bytes to spool, or a Part 10 file already written on the spool's filesystem (a C-STORE's,
    received to disk) to move into place, asked for only once the identity is sound.
    """
    try:
        # Back-pressure first: an instance the node cannot keep now (disk below its floor, the job store
        # or the object store down) is refused before any work, and the sender retries later.
        trouble = health.refusal() if health is not None else None
        if trouble is not None:
            raise Refusal(STATUS_OUT_OF_RESOURCES, trouble[0], trouble[1])
        try:
            header = read_header()
        except Refusal:
            raise
        except Exception as exc:  # a header pydicom cannot parse
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "unreadable", f"unreadable dataset: {exc}") from exc
        key, sop_uid, sop_class = check_identity(header, claim, study_uid)
        try:
            data = encoded()
            path = spool.move_in(key, sop_uid, data) if isinstance(data, Path) else spool.write(key, sop_uid, data)
        except StoreUnavailable as exc:  # not confirmed by the object store: not acknowledged
            log.error("could not store %s from %s@%s: %s", sop_uid, origin.calling_ae, origin.host, exc)
            if health is not None:
                health.down(OBJECT_STORE, str(exc))
            raise Refusal(STATUS_OUT_OF_RESOURCES, OBJECT_STORE, "object store unavailable") from exc
        except OSError as exc:
            log.error("could not store %s from %s@%s: %s", sop_uid, origin.calling_ae, origin.host, exc)
            raise Refusal(STATUS_OUT_OF_RESOURCES, "disk", f"node cannot store: {exc.strerror or exc}") from exc
        instance = ReceivedInstance(
            key=key,
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            path=path,
            calling_ae=origin.calling_ae,
            calling_host=origin.host,
            modality=str(header.get("Modality", "")),
            received_at=datetime.now(timezone.utc),
            facts=facts_from_header(sop_uid, header),
        )
        try:
            on_stored(instance)
        except Exception as exc:  # the file is on disk, but without a job row the sender must retry
            log.error("could not record %s from %s@%s: %s", sop_uid, origin.calling_ae, origin.host, exc)
            raise Refusal(STATUS_OUT_OF_RESOURCES, "job_store", f"node cannot record the instance: {exc}") from exc
    except Refusal as refusal:
        if refusal.status == STATUS_CANNOT_UNDERSTAND:
            log.warning("refused instance from %s@%s: %s", origin.calling_ae, origin.host, refusal.comment)
        if on_refused is not None:
            on_refused(refusal.reason)
        raise
    return instance
