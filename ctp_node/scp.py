"""The receiving side: a pynetdicom SCP answering C-ECHO and C-STORE of CT and Enhanced CT images.

The C-STORE handler only writes the instance durably to the spool (without decoding its pixel data)
and reports it to ``on_stored``; it never waits on processing. Refusals are explicit DICOM
statuses with an ErrorComment: 0xA700 (out of resources: the disk), 0xC000 (cannot understand:
invalid UIDs). Associations are refused for a wrong called AE title and, with an allow-list, for a
calling AE title / host pair not on it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
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
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from ctp_node.config import DicomSettings
from ctp_node.spool import InvalidUIDError, SeriesKey, Spool, check_uid

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

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
    path: Path
    calling_ae: str
    calling_host: str
    modality: str
    received_at: datetime


OnStored = Callable[[ReceivedInstance], None]


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _series_header(event: evt.Event) -> Dataset:
    """The elements up to SeriesInstanceUID, read from the raw stream without copying the pixel data
    (decoding the whole dataset costs about 1 ms per 512 x 512 instance)."""
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        return event.dataset
    stream = event.request.DataSet
    stream.seek(0)
    try:
        return read_dataset(
            stream, syntax.is_implicit_VR, syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag > 0x0020000E,
        )  # fmt: skip
    finally:
        stream.seek(0)


def handle_store(event: evt.Event, spool: Spool, on_stored: OnStored) -> int | Dataset:
    """Write one instance to the spool; Success only once it is on disk."""
    calling_ae = event.assoc.requestor.ae_title
    host = event.assoc.requestor.address
    try:
        header = _series_header(event)
        key = SeriesKey(
            check_uid(header.get("StudyInstanceUID"), "StudyInstanceUID"),
            check_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        )
        sop_uid = check_uid(event.request.AffectedSOPInstanceUID, "SOPInstanceUID")
    except InvalidUIDError as exc:
        log.warning("refused instance from %s@%s: %s", calling_ae, host, exc)
        return _failure(STATUS_CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # a header pydicom cannot parse
        log.warning("refused unreadable instance from %s@%s: %s", calling_ae, host, exc)
        return _failure(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {exc}")
    try:
        path = spool.write(key, sop_uid, event.encoded_dataset(include_meta=True))
    except OSError as exc:
        log.error("could not store %s from %s@%s: %s", sop_uid, calling_ae, host, exc)
        return _failure(STATUS_OUT_OF_RESOURCES, f"node cannot store: {exc.strerror or exc}")
    try:
        on_stored(
            ReceivedInstance(
                key=key,
                sop_uid=sop_uid,
                sop_class_uid=str(event.request.AffectedSOPClassUID),
                path=path,
                calling_ae=calling_ae,
                calling_host=host,
                modality=str(header.get("Modality", "")),
                received_at=datetime.now(timezone.utc),
            )
        )
    except Exception as exc:  # the file is on disk, but without a job row the sender must retry
        log.error("could not record %s from %s@%s: %s", sop_uid, calling_ae, host, exc)
        return _failure(STATUS_OUT_OF_RESOURCES, f"node cannot record the instance: {exc}")
    return STATUS_SUCCESS


def handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS


def handle_requested(event: evt.Event, dicom: DicomSettings) -> None:
    """Refuse an association whose calling AE title and host are not on the allow-list."""
    if not dicom.allowed_callers:
        return
    calling = event.assoc.requestor.primitive.calling_ae_title.strip()
    host = event.assoc.requestor.address
    for allowed in dicom.allowed_callers:
        if allowed.ae_title == calling and (allowed.host is None or allowed.host == host):
            return
    log.warning("rejected association from %s@%s: not on the allow-list", calling, host)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading each PDU with as few ``recv`` calls as the kernel allows.

    pynetdicom asks for 4 KB per call, 128 Python-level calls and copies for every 512 x 512
    instance; reading into one buffer sized to the PDU returns the same bytes (a short buffer when
    the peer closes, exceptions unchanged) for a quarter less CPU per instance (benchmarks/ingest.py).
    """

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            count = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:  # connection closed: what arrived, as pynetdicom returns it
                return buffer[:nr_read]
            nr_read += count
        return buffer


def tune_connection(event: evt.Event, dicom: DicomSettings) -> None:
    """Per-connection transport settings, applied as the association opens."""
    dul = event.assoc.dul
    if dul.socket is None:
        return
    # Delayed ACKs cost 40 ms per PDU exchange: 43 s instead of 0.9 s for a 960-instance study.
    dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dul.socket.__class__ = BulkReadSocket
    # pynetdicom's reactor sleeps this long whenever it finds nothing to do (1 ms by default),
    # which is on the path of every PDU and every response.
    dul._run_loop_delay = dicom.poll_interval_ms / 1000.0


def ssl_context(dicom: DicomSettings) -> ssl.SSLContext | None:
    if dicom.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(dicom.tls.certificate), keyfile=str(dicom.tls.private_key))
    if dicom.tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(dicom.tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if dicom.tls.require_client_certificate else ssl.CERT_NONE
    return context


def build_ae(dicom: DicomSettings) -> AE:
    ae = AE(ae_title=dicom.ae_title)
    ae.require_called_aet = True
    ae.maximum_pdu_size = dicom.max_pdu_bytes
    ae.maximum_associations = dicom.max_associations
    ae.acse_timeout = dicom.acse_timeout_s
    ae.dimse_timeout = dicom.dimse_timeout_s
    ae.network_timeout = dicom.network_timeout_s
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def start_scp(dicom: DicomSettings, spool: Spool, on_stored: OnStored) -> ThreadedAssociationServer:
    """Start listening in background threads; ``server.shutdown()`` stops it."""
    ae = build_ae(dicom)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, on_stored]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REQUESTED, handle_requested, [dicom]),
        (evt.EVT_CONN_OPEN, tune_connection, [dicom]),
    ]
    server = ae.start_server(
        (dicom.bind_address, dicom.port), block=False, evt_handlers=handlers, ssl_context=ssl_context(dicom)
    )
    log.info("listening as %s on %s:%d", dicom.ae_title, dicom.bind_address, dicom.port)
    return server
