"""STOW-RS (DICOMweb Store, PS3.18 10.5): instances POSTed over HTTP into C-STORE's spool and job store.

``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}`` take ``multipart/related;
type="application/dicom"``, each part one Part 10 file. Each part goes through the C-STORE path's
own checks and durable write (``ctp_node.node.receive.ingest.accept_instance``): the file meta's Media
Storage UIDs stand where the C-STORE command's Affected UIDs do, the transfer syntax must be one the
SCP accepts, and on ``/studies/{study}`` the instance must belong to that study. A refusal is
counted in ``ctp_node_refused_instances{reason}`` as for C-STORE.

The answer is a Store Instances Response (``application/dicom+json``): ReferencedSOPSequence for
the stored instances, FailedSOPSequence (with FailureReason, PS3.18 Table I.2-2: the C-STORE status,
0x0122 for a SOP class other than CT, 0xC122 for a transfer syntax the node does not read) for the
refused ones, OtherFailuresSequence for parts that name no instance; each refusal's reason in
words in a ``Warning: 299`` header. HTTP status: 200 all stored; 202 some stored, some not; 409
none stored; 503 (with Retry-After) none stored because the node is out of resources (disk, job
store) or busy (more than ``dicom.max_associations`` requests at once); 400 a malformed body
(nothing stored) or study UID; 413 a body over ``[dicomweb] max_request_bytes``; 415 another media
type; 408 a body that stalls for ``dicom.network_timeout_s``. The request body is written to an
unnamed temporary file in the data folder (gone with the process, never in memory) and parsed from
there, one part at a time. A part whose file meta lacks the 128-byte preamble and "DICM" (what
pydicom writes for a dataset not read from a file) is spooled with them added, otherwise as sent.
Authentication is the web app's (``ctp_node.web.app`` includes this router behind it), or a
bearer ``token`` given here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ctp_node.config import DicomwebSettings, Settings
from ctp_node.node.receive.ingest import (
    ACCEPTED_TRANSFER_SYNTAXES,
    Claim,
    OnRefused,
    OnStored,
    Origin,
    Refusal,
    accept_instance,
)
from ctp_node.node.shared.completeness import LAST_TAG_READ
from ctp_node.node.shared.dicom_status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
)
from ctp_node.node.shared.health import ResourceHealth
from ctp_node.node.shared.spool import InvalidUIDError, check_uid
from ctp_node.node.shared.storage import AnySpool
from ctp_node.permissions import make_dirs

log = logging.getLogger(__name__)

STOW_CALLING_AE = "STOW-RS"  # stands for the calling AE title in the job store, the audit log and metrics
DICOM_MEDIA_TYPE = "application/dicom"
RESPONSE_MEDIA_TYPE = "application/dicom+json"
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 Table I.2-2
READ_CHUNK = 1 << 20
PART_IN_MEMORY = 16 << 20  # a part larger than this waits in a temporary file
RETRY_AFTER_S = 30
MAX_WARNINGS = 10
# The STOW-RS failure reason of a refusal whose C-STORE status says less (C-STORE refuses these at
# association negotiation; STOW-RS has codes of its own).
FAILURE_REASON_BY_REFUSAL = {
    "sop_class": STATUS_SOP_CLASS_NOT_SUPPORTED,
    "transfer_syntax": STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
}


class StowReceiver(Protocol):
    """What the router needs of ``ctp_node.node.receive.receiver.Receiver``."""

    settings: Settings
    spool: AnySpool
    health: ResourceHealth | None  # back-pressure: refused with 0xA700 while it reports trouble

    def on_stored(self, instance: Any) -> None: ...
    def on_refused(self, reason: str) -> None: ...


@dataclass
class Outcome:
    """What became of one request's parts."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str | None, str | None, int, str]] = field(default_factory=list)  # class, instance, reason, why
    other: list[tuple[int, str]] = field(default_factory=list)  # failures naming no instance
    malformed: bool = False  # the body is not a well-formed multipart/related message

    @property
    def failures(self) -> list[tuple[int, str]]:
        return [(reason, why) for *_, reason, why in self.failed] + self.other

    def http_status(self) -> int:
        if not self.failures:
            return 200 if self.stored else 400
        if self.stored:
            return 202
        if self.malformed:
            return 400
        if all(reason >> 8 == 0xA7 for reason, _ in self.failures):
            return 503  # out of resources: the same request may succeed later
        return 409

    def response_dataset(self) -> Dataset:
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_item(sop_class, sop_uid) for sop_class, sop_uid in self.stored]
        if self.failed:
            items = []
            for sop_class, sop_uid, reason, _ in self.failed:
                item = _item(sop_class, sop_uid)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = items
        if self.other:
            others = []
            for reason, _ in self.other:
                item = Dataset()
                item.FailureReason = reason
                others.append(item)
            ds.OtherFailuresSequence = others
        return ds


def _item(sop_class: str | None, sop_uid: str | None) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_uid:
        item.ReferencedSOPInstanceUID = sop_uid
    return item


def _uid_or_none(value: object) -> str | None:
    try:
        return check_uid(value, "UID") if value is not None else None
    except InvalidUIDError:
        return None


WARNING_CHARS = 200  # a header stays short: proxies and clients cap their size


def _warning(text: str) -> str:
    """A Warning header (PS3.18 8.x: code 299) with the text made printable ASCII, quotes escaped,
    cut after a whole word. pydicom's advice to its own caller ("Use force=True ...") is dropped:
    the sender cannot act on it."""
    text = re.sub(r"\s*Use force=True to force reading\.?", "", text)
    clean = re.sub(r"[^\x20-\x7e]", "?", text)
    if len(clean) > WARNING_CHARS:
        clean = clean[: WARNING_CHARS - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."
    clean = clean.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 ctp-node "{clean}"'


class _PartStore:
    """Parses a multipart/related body (python-multipart) and stores each part as it ends."""

    def __init__(
        self,
        boundary: bytes,
        default_type: str,
        study_uid: str | None,
        origin: Origin,
        spool: AnySpool,
        on_stored: OnStored,
        on_refused: OnRefused,
        scratch: Path,
        max_part_bytes: int | None = None,
        health: ResourceHealth | None = None,
    ) -> None:
        self.health = health
        self.default_type, self.study_uid, self.origin = default_type, study_uid, origin
        self.spool, self.on_stored, self.on_refused, self.scratch = spool, on_stored, on_refused, scratch
        # dicom.max_instance_bytes: a longer part is refused without being read into memory (only its
        # first max_part_bytes are kept, on disk, to name the instance in the answer).
        self.max_part_bytes = max_part_bytes
        self._part_bytes = 0
        self.outcome = Outcome()
        self.ended = False
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._data: IO[bytes] | None = None
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
                "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=16,
        )

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""
        # closed in _part_end (or by run() when the body ends inside a part)
        self._data = tempfile.SpooledTemporaryFile(max_size=PART_IN_MEMORY, dir=self.scratch)  # noqa: SIM115
        self._part_bytes = 0

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._data is not None
        kept = self._part_bytes
        self._part_bytes += end - start
        if self.max_part_bytes is not None and self._part_bytes > self.max_part_bytes:
            end = start + max(0, self.max_part_bytes - kept)  # the rest is counted, not kept
        self._data.write(data[start:end])

    def _end(self) -> None:
        self.ended = True

    def _part_end(self) -> None:
        assert self._data is not None
        try:
            self._data.seek(0)
            if self.max_part_bytes is not None and self._part_bytes > self.max_part_bytes:
                self._refuse_oversized(self._data)
            else:
                self._store(self._data.read())
        except Exception as exc:  # a bug must cost this part, not the request's other parts
            log.exception("STOW-RS part from %s could not be handled", self.origin.host)
            self.outcome.other.append((STATUS_PROCESSING_FAILURE, f"part not handled: {type(exc).__name__}"))
        finally:
            self._data.close()
            self._data = None

    def _refuse_oversized(self, data: IO[bytes]) -> None:
        """Refuse a part over ``max_part_bytes`` (0xC000: the same request would fail again), naming the
        instance when its first bytes hold a readable header; never read whole."""
        comment = f"instance of {self._part_bytes} bytes: more than {self.max_part_bytes} (dicom.max_instance_bytes)"
        log.warning("refused a STOW-RS part from %s: %s", self.origin.host, comment)
        self.on_refused("too_large")
        header = None
        with contextlib.suppress(Exception):  # no name, then: the refusal stands without one
            header = read_partial(data, stop_when=lambda tag, vr, length: tag > LAST_TAG_READ)
        sop_uid = _uid_or_none(header.get("SOPInstanceUID")) if header is not None else None
        if sop_uid is None:
            self.outcome.other.append((STATUS_CANNOT_UNDERSTAND, comment))
        else:
            self.outcome.failed.append(
                (_uid_or_none(header.get("SOPClassUID")), sop_uid, STATUS_CANNOT_UNDERSTAND, comment)  # type: ignore[union-attr]
            )

    def _store(self, data: bytes) -> None:
        media_type = parse_options_header(self._headers.get("content-type", self.default_type))[0].decode("latin-1")
        if media_type.lower() != DICOM_MEDIA_TYPE:
            self.on_refused("media_type")
            self.outcome.other.append(
                (STATUS_CANNOT_UNDERSTAND, f"a part of type {media_type}: only {DICOM_MEDIA_TYPE}")
            )
            return
        if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
            # The file meta without the preamble and prefix (what pydicom writes for a dataset not
            # read from a file, so what many clients send): made a Part 10 file, otherwise as sent.
            data = bytes(128) + b"DICM" + data
        header: Dataset | None = None
        error: Exception | None = None
        try:
            header = read_partial(io.BytesIO(data), stop_when=lambda tag, vr, length: tag > LAST_TAG_READ)
        except Exception as exc:  # no preamble / DICM prefix, a broken file meta
            error = exc
        meta = getattr(header, "file_meta", None)

        def read_header() -> Dataset:
            if header is None:
                raise ValueError(f"not a DICOM Part 10 file (preamble, DICM, file meta): {error}")
            syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
                raise Refusal(
                    STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
                    "transfer_syntax",
                    f"transfer syntax {syntax or '(none in the file meta)'} is not one the node reads",
                )
            return header

        try:
            instance = accept_instance(
                read_header,
                Claim.from_file_meta(meta),
                lambda: data,
                self.origin,
                self.spool,
                self.on_stored,
                self.on_refused,
                study_uid=self.study_uid,
                health=self.health,
            )
        except Refusal as refusal:
            reason = FAILURE_REASON_BY_REFUSAL.get(refusal.reason, refusal.status)
            sop_class = _uid_or_none(header.get("SOPClassUID") if header is not None else None)
            sop_uid = _uid_or_none(header.get("SOPInstanceUID") if header is not None else None)
            if meta is not None:
                sop_class = sop_class or _uid_or_none(meta.get("MediaStorageSOPClassUID"))
                sop_uid = sop_uid or _uid_or_none(meta.get("MediaStorageSOPInstanceUID"))
            if sop_uid is None:
                self.outcome.other.append((reason, refusal.comment))
            else:
                self.outcome.failed.append((sop_class, sop_uid, reason, refusal.comment))
            return
        self.outcome.stored.append((instance.sop_class_uid, instance.sop_uid))

    def run(self, body: IO[bytes]) -> Outcome:
        body.seek(0)
        try:
            while chunk := body.read(READ_CHUNK):
                self.parser.write(chunk)
            self.parser.finalize()
        except MultipartParseError as exc:
            self.outcome.malformed = True
            self.outcome.other.append((STATUS_CANNOT_UNDERSTAND, f"malformed multipart body: {exc}"))
        else:
            if not self.ended:
                self.outcome.malformed = True
                self.outcome.other.append((STATUS_CANNOT_UNDERSTAND, "the body ends before its closing boundary"))
        finally:
            if self._data is not None:
                self._data.close()
        return self.outcome


class _Slots:
    """At most ``limit`` STOW-RS requests at once (the DICOM side's max_associations)."""

    def __init__(self, limit: int) -> None:
        self._semaphore = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._semaphore.acquire(blocking=False)

    def give(self) -> None:
        self._semaphore.release()


def _bearer(token: str) -> Any:
    expected = token.encode()

    def check(request: Request) -> None:
        scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), expected):
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    return check


def stow_router(receiver: StowReceiver, *, token: str | None = None, prefix: str = "/dicomweb") -> APIRouter:
    """The STOW-RS endpoints, storing through ``receiver`` (started: its job store writer runs).

    ``token``: require ``Authorization: Bearer <token>`` here (the web app authenticates on its own).
    """
    settings = receiver.settings
    limits: DicomwebSettings = getattr(settings, "dicomweb", None) or DicomwebSettings()
    chunk_timeout_s = settings.dicom.network_timeout_s
    slots = _Slots(settings.dicom.max_associations)
    scratch = settings.storage.data_dir / "incoming"
    router = APIRouter(prefix=prefix, dependencies=[Depends(_bearer(token))] if token is not None else [])

    async def store(request: Request, study_uid: str | None) -> Response:
        media_type, params = parse_options_header(request.headers.get("content-type", ""))
        declared = params.get(b"type", DICOM_MEDIA_TYPE.encode()).decode("latin-1").lower()
        if media_type.decode("latin-1").lower() != "multipart/related" or declared != DICOM_MEDIA_TYPE:
            raise HTTPException(415, f'send multipart/related; type="{DICOM_MEDIA_TYPE}" (one Part 10 file a part)')
        boundary = params.get(b"boundary")
        if not boundary:
            raise HTTPException(400, "the Content-Type has no boundary parameter")
        if study_uid is not None:
            try:
                study_uid = check_uid(study_uid, "StudyInstanceUID")
            except InvalidUIDError as exc:
                raise HTTPException(400, str(exc)) from exc
        accept = request.headers.get("accept", "")
        if accept and not any(
            t in accept for t in (RESPONSE_MEDIA_TYPE, "application/json", "application/*", "*/*")
        ):  # fmt: skip
            raise HTTPException(406, f"the response is {RESPONSE_MEDIA_TYPE}")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_request_bytes:
            raise HTTPException(413, f"the body may be at most {limits.max_request_bytes} bytes: send fewer instances")
        if not slots.take():
            raise HTTPException(
                503, "too many STOW-RS requests at once; try again", headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        host = request.client.host if request.client else "unknown"
        try:
            await run_in_threadpool(make_dirs, scratch)
            with tempfile.TemporaryFile(dir=scratch) as body:
                await _receive(request, body, limits.max_request_bytes, chunk_timeout_s)
                parts = _PartStore(
                    boundary,
                    DICOM_MEDIA_TYPE,
                    study_uid,
                    Origin(STOW_CALLING_AE, host),
                    receiver.spool,
                    receiver.on_stored,
                    receiver.on_refused,
                    scratch,
                    settings.dicom.max_instance_bytes,
                    getattr(receiver, "health", None),
                )
                outcome = await run_in_threadpool(parts.run, body)
        finally:
            slots.give()
        status = outcome.http_status()
        log.info(
            "STOW-RS from %s: %d stored, %d refused (HTTP %d)", host, len(outcome.stored), len(outcome.failures), status
        )
        headers = {}
        reasons = list(dict.fromkeys(why for _, why in outcome.failures))[:MAX_WARNINGS]
        if not outcome.stored and not outcome.failures:
            reasons = ["the body holds no part"]
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        content = json.dumps(outcome.response_dataset().to_json_dict()).encode()
        response = Response(content, status_code=status, media_type=RESPONSE_MEDIA_TYPE, headers=headers)
        for reason in reasons:
            response.headers.append("Warning", _warning(reason))
        return response

    @router.post("/studies", summary="STOW-RS: store instances")
    async def store_instances(request: Request) -> Response:
        return await store(request, None)

    @router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study")
    async def store_study_instances(request: Request, study_uid: str) -> Response:
        return await store(request, study_uid)

    return router


async def _receive(request: Request, body: IO[bytes], limit: int, chunk_timeout_s: float) -> None:
    """Copy the request body to ``body``: 413 past ``limit`` bytes, 408 when it stalls."""
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), chunk_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError as exc:
            raise HTTPException(408, f"the body stalled for {chunk_timeout_s} s") from exc
        except ClientDisconnect as exc:
            raise HTTPException(400, "the client went away before the body ended") from exc
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"the body may be at most {limit} bytes: send fewer instances")
        body.write(chunk)
