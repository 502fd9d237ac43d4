"""The sending side: C-STORE files to a DICOM peer, and C-ECHO it (pynetdicom SCU).

Used by the node to deliver results and by ``ctp-node phantom --send``. One association for all
files, proposing exactly the (SOP class, transfer syntax) pairs the files use, since the files are
sent as stored (no transcoding). The connection gets the SCP's socket (``scp.tune_socket``) as
soon as it is open: TCP_NODELAY, since C-STORE exchanges many small PDUs and Nagle's algorithm would
add latency to each; a quick ACK after each read, since a peer with Nagle on (DCMTK's storescp
default) holds each response's tail until we acknowledge its start, 40 ms later with a delayed ACK
(about 22 s of waiting for a 456-instance result); each PDU's claimed length checked and a timeout
on every read and send, so a broken peer cannot hold a worker. A failed status is returned as a
value per file, not raised, so the caller decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctp_node.errors import PeerError
from ctp_node.node.dicom_status import STATUS_SUCCESS, STORED


@dataclass(frozen=True)
class Peer:
    """A C-STORE destination parsed from ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Peer:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{text!r} must look like HOST:PORT:AET, e.g. 127.0.0.1:11112:STORESCP")
        host, port, aet = parts
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: port {port!r} is not a TCP port number")
        if len(aet) > 16:
            raise ValueError(f"{text!r}: AE titles have at most 16 characters")
        return cls(host, int(port), aet)


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # DIMSE status; None when no response arrived

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status in STORED


def _tuned(timeout_s: float) -> list:
    """The handler that gives each new connection the node's socket settings."""
    from pynetdicom import evt

    from ctp_node.node.scp import tune_socket

    return [(evt.EVT_CONN_OPEN, lambda event: tune_socket(event.assoc, timeout_s))]


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
) -> list[SendResult]:
    """Send ``paths`` over one association; PeerError (a ConnectionError) if no association could be made."""
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
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=_tuned(timeout_s))
    if not assoc.is_established:
        raise PeerError(
            f"no association with {peer.ae_title} at {peer.host}:{peer.port}: check the address, the AE title "
            "and that the peer accepts CT Image / Enhanced CT storage in this transfer syntax"
        )
    results = []
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
            results.append(SendResult(path, int(response.Status) if "Status" in response else None))
            if progress:
                progress(done, len(paths))
    finally:
        assoc.release()
    return results
