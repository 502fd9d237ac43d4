"""The sending side: C-STORE files to a DICOM peer, and C-ECHO it (pynetdicom SCU).

Used by the node to deliver results and by ``ctp-node phantom --send``. One association for all files,
proposing exactly the (SOP class, transfer syntax) pairs the files use, since the files are sent as
stored (no transcoding). The connection gets the SCP's socket
(``ctp_node.node.shared.dicom_transport.tune_socket``) as soon as it is open: TCP_NODELAY, since C-STORE
exchanges many small PDUs and Nagle's algorithm would add latency to each; a quick ACK after each read,
since a peer with Nagle on (DCMTK's storescp default) holds each response's tail until we acknowledge
its start, 40 ms later with a delayed ACK (about 22 s of waiting for a 456-instance result); each PDU's
claimed length checked and a timeout on every read and send, so a broken peer cannot hold a worker. A
failed status is returned as a value per file, not raised, so the caller decides; so is an association
that ends half way (the files it confirmed keep their status, the others get none), so that a retry
sends only the rest.

Timeouts: ``acse_timeout_s`` for association set-up and release, ``dimse_timeout_s`` for each
C-STORE/C-ECHO response, ``network_timeout_s`` for every PDU (the node passes its ``[dicom]`` ones).

pynetdicom's reactor race (issue 23; pynetdicom issue 875): the requestor's association thread (its
"reactor") must be paused while ``send_c_store`` reads the answer off the shared DIMSE queue. The
sender clears ``_reactor_checkpoint`` and waits for ``_is_paused``; the reactor sets ``_is_paused``,
waits on the checkpoint and clears ``_is_paused`` once woken. When a C-STORE ends it sets the
checkpoint, and the next C-STORE clears it again at once: if the woken reactor has not run yet,
``_is_paused`` still reads True, the next request goes out, and the reactor then takes that request's
answer off the queue ("Received unexpected C-STORE service message"), drops it, and the sender waits
out the DIMSE timeout and aborts. Under CPU load with a fast peer (DCMTK's storescp) that was 5 sends
in 10 of 488 files. No pynetdicom release fixes it (3.0.4 is the newest); ``_RecheckingCheckpoint``
is the upstream fix done from outside: the reactor re-checks the checkpoint after waking and pauses
again if a sender cleared it meanwhile. It is installed on each association this module opens, only
on the pynetdicom versions whose reactor was read for it (``_VETTED_PYNETDICOM``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctp_node.errors import PeerError
from ctp_node.node.shared.dicom_status import STATUS_SUCCESS, STORED
from ctp_node.node.shared.peer import Peer

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # DIMSE status; None when no response arrived (or the file was never sent)

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status in STORED


# pynetdicom versions whose Association._run_reactor was read for the race above (2.1.1, 3.0.0, 3.0.3,
# 3.0.4: the same pause/wait/unpause lines); on another, vet it again and extend this (or drop the
# workaround once upstream re-checks the checkpoint itself).
_VETTED_PYNETDICOM = ((2, 1), (3, 0))


class _RecheckingCheckpoint(threading.Event):
    """An association's ``_reactor_checkpoint`` whose ``wait`` (called by the reactor alone) returns only
    while the checkpoint is still set after the reactor has marked itself running.

    The upstream fix is two lines in ``Association._run_reactor``: after ``_is_paused = False``, go back to
    waiting if the checkpoint is no longer set. Done here, in the same order: a sender clears the
    checkpoint and then reads ``_is_paused``; the reactor clears ``_is_paused`` and then reads the
    checkpoint, so at least one of them sees the other and the reactor never runs beside a request.
    """

    def __init__(self, assoc: Association, is_set: bool) -> None:
        super().__init__()
        self._assoc = assoc
        if is_set:
            self.set()

    def wait(self, timeout: float | None = None) -> bool:
        while True:
            if not super().wait(timeout):
                return False
            self._assoc._is_paused = False
            if self.is_set():
                return True
            self._assoc._is_paused = True  # a sender paused us between the wake-up and now: wait again


def _pynetdicom_vetted() -> bool:
    import pynetdicom

    try:
        version = tuple(int(p) for p in pynetdicom.__version__.split(".")[:2])
    except ValueError:
        return False
    return version in _VETTED_PYNETDICOM


def fix_reactor_race(assoc: Association) -> bool:
    """Install ``_RecheckingCheckpoint`` on a requestor's association before its reactor starts (at
    EVT_CONN_OPEN); False (and a warning) where this pynetdicom was not vetted for it."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(checkpoint, _RecheckingCheckpoint):
        return True
    # With network_timeout_response "A-RELEASE" the reactor waits on the checkpoint and then calls release(),
    # which waits for _is_paused, in its own thread: after this wait() that would never end. Not used here.
    if (
        not _pynetdicom_vetted()
        or not isinstance(checkpoint, threading.Event)
        or not hasattr(assoc, "_is_paused")
        or assoc.network_timeout_response != "A-ABORT"
    ):
        log.warning("pynetdicom's reactor race is not worked around on this version (see ctp_node.node.work.scu)")
        return False
    assoc._reactor_checkpoint = _RecheckingCheckpoint(assoc, checkpoint.is_set())
    return True


def _on_open(event: Any, timeout_s: float) -> None:
    from ctp_node.node.shared.dicom_transport import tune_socket

    if event.assoc.is_requestor:
        fix_reactor_race(event.assoc)
    tune_socket(event.assoc, timeout_s)


def _tuned(timeout_s: float) -> list:
    """The handler that gives each new connection the node's socket settings (and the reactor fix)."""
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, lambda event: _on_open(event, timeout_s))]


def echo(peer: Peer, calling_ae_title: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """C-ECHO the peer: (True, "...") when it answers Success, else (False, the reason)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=_tuned(timeout_s))
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or unreachable)"
        return False, f"{peer.ae_title} at {peer.host}:{peer.port}: {reason}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" in status and status.Status == STATUS_SUCCESS:
        return True, f"{peer.ae_title} at {peer.host}:{peer.port} answered C-ECHO"
    return False, f"{peer.ae_title} at {peer.host}:{peer.port}: C-ECHO failed ({status.get('Status', 'no response')})"


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    calling_ae_title: str = "CTPNODE_PHANTOM",
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 60.0,
    *,
    dimse_timeout_s: float = 30.0,
    acse_timeout_s: float = 30.0,
    on_result: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``paths`` over one association: one result per path, in order, ``status`` None for a file
    whose answer never came (the association ended, or it was never sent). ``timeout_s`` is the
    network timeout; ``on_result`` is called with each file's result as soon as the peer answers.
    PeerError (a ConnectionError) if no association could be made or the peer refuses the contexts."""
    from pydicom import dcmread
    from pynetdicom import AE

    contexts = sorted(
        {
            (str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
            for h in (dcmread(p, stop_before_pixels=True) for p in paths)
        }
    )
    ae = AE(ae_title=calling_ae_title)
    ae.network_timeout = timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.acse_timeout = acse_timeout_s
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=_tuned(timeout_s))
    if not assoc.is_established:
        raise PeerError(
            f"no association with {peer.ae_title} at {peer.host}:{peer.port}: check the address, the AE title "
            "and that the peer accepts CT Image / Enhanced CT storage in this transfer syntax"
        )
    results: list[SendResult] = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        missing = [c for c in contexts if c not in accepted]
        if missing:
            raise PeerError(
                f"{peer.ae_title} rejected {missing} (SOP class, transfer syntax): send with "
                "--transfer-syntax explicit or configure the peer to accept it"
            )
        for done, path in enumerate(paths, start=1):
            response = assoc.send_c_store(dcmread(path))
            result = SendResult(path, int(response.Status) if "Status" in response else None)
            results.append(result)
            if on_result:
                on_result(result)
            if progress:
                progress(done, len(paths))
            if result.status is None or not assoc.is_established:
                # No answer: the DIMSE timeout (pynetdicom then aborts), a peer that aborted or a lost
                # connection. The association is over; what was confirmed stays confirmed.
                log.warning("association with %s ended after %d of %d files", peer.ae_title, done, len(paths))
                break
    finally:
        assoc.release()
    return results + [SendResult(path, None) for path in paths[len(results) :]]
