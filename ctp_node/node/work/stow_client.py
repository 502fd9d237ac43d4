"""The STOW-RS client: results sent to DICOMweb destinations (dicomweb-client) instead of C-STORE.

The node's STOW-RS server, which receives, is ``ctp_node.web.stow``; this module only sends.

A destination with ``kind = "dicomweb"`` names the service's base ``url`` (the part before
``/studies``, e.g. ``https://pacs.example/dicom-web``), optionally ``auth`` (a bearer token, or HTTP
basic with a user and password, each read from an environment variable or a file) and
``ca_certificates`` for a private CA. :func:`send_files_dicomweb` returns one ``scu.SendResult`` per
file, as ``scu.send_files`` does, so that the send stage treats both kinds alike: the status is the
instance's FailureReason (e.g. 0xA700, 0xC000, 0x0122) when the service refused it, its
WarningReason (0xB000, 0xB006, 0xB007: stored) or 0x0000 when stored, None when the answer did not
mention it. Files go in requests of at most ``batch_bytes`` (the client holds a request's body in
memory). A service that cannot be reached, times out, or answers with an HTTP error that names no
instance raises ``PeerError`` (a ConnectionError: a transient failure the send stage retries);
dicomweb-client's own retries are off, since the send stage has its backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset

from ctp_node.config import Destination
from ctp_node.errors import PeerError
from ctp_node.node.shared.dicom_status import STATUS_SUCCESS
from ctp_node.node.work.scu import SendResult

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 64 << 20


def session_for(destination: Destination) -> requests.Session:
    """A requests session with the destination's authentication and certificate authority."""
    session = requests.Session()
    auth = destination.auth
    if auth is not None:
        if (destination.url or "").startswith("http://"):
            log.warning("destination %s: credentials over plain http; use https outside a test", destination.name)
        secret = auth.secret.read()
        if auth.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {secret}"
        else:
            assert auth.username is not None
            session.auth = (auth.username, secret)
    if destination.ca_certificates is not None:
        session.verify = str(destination.ca_certificates)
    return session


def client_for(destination: Destination, session: requests.Session | None = None):  # -> DICOMwebClient
    from dicomweb_client.api import DICOMwebClient

    if destination.kind != "dicomweb" or destination.url is None:
        raise ValueError(f"destination {destination.name!r} is not a DICOMweb destination (kind = 'dicomweb', url)")
    client = DICOMwebClient(
        url=destination.url.rstrip("/"),
        session=session or session_for(destination),
        timeout=destination.timeout_s,
    )
    client.set_http_retry_params(retry=False)
    return client


def _batches(files: Sequence[Path], batch_bytes: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for path in files:
        length = path.stat().st_size
        if batch and size + length > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


def _statuses(answer: Dataset) -> dict[str, int]:
    """SOP Instance UID -> status, from a Store Instances Response."""
    statuses: dict[str, int] = {}
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        statuses[uid] = int(item.get("WarningReason", STATUS_SUCCESS))
    for item in answer.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        statuses[uid] = int(item.get("FailureReason", 0xC000))
    return statuses


def _answer_of(response: requests.Response) -> Dataset | None:
    """The Store Instances Response in an HTTP error's body, when the service sent one."""
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in (
        "application/dicom+json",
        "application/json",
    ):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def send_files_dicomweb(
    files: Sequence[Path],
    destination: Destination,
    progress: Callable[[int, int], None] | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    session: requests.Session | None = None,
) -> list[SendResult]:
    """STOW-RS ``files`` to ``destination``; one SendResult per file, PeerError when the service fails."""
    client = client_for(destination, session)
    where = f"DICOMweb destination {destination.name} at {destination.url}"
    results: list[SendResult] = []
    for batch in _batches(files, batch_bytes):
        datasets = [dcmread(path) for path in batch]
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            response = exc.response
            answer = _answer_of(response) if response is not None else None
            code = response.status_code if response is not None else "?"
            if answer is None or not _statuses(answer):
                hint = ": check the destination's auth" if code in (401, 403) else ""
                raise PeerError(f"{where} answered HTTP {code}{hint}") from exc
        except requests.RequestException as exc:
            raise PeerError(f"{where} could not be reached: {type(exc).__name__}: {exc}") from exc
        statuses = _statuses(answer)
        told = bool(statuses)
        for path, ds in zip(batch, datasets):
            uid = str(ds.SOPInstanceUID)
            # A 2xx answer without a per-instance list says every instance was stored.
            status = statuses.get(uid) if told else STATUS_SUCCESS
            results.append(SendResult(path, status))
        if progress:
            progress(len(results), len(files))
    refused = [r for r in results if not r.ok]
    if refused:
        log.warning("%s refused %d of %d instances", where, len(refused), len(results))
    return results
