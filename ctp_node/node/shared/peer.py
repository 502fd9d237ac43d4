"""A DICOM peer by address: what both directions name when they open an association.

The send stage delivers to one (``ctp_node.node.work.scu``, ``send_stage.peer_for``) and
``reprocess --from-pacs`` pulls a series from one (``ctp_node.node.receive.retrieve``). Plain data, no
pynetdicom: a command that only parses ``HOST:PORT:AET`` loads no DICOM networking.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """A DICOM peer (a C-STORE destination, a C-GET source) parsed from ``HOST:PORT:AET``."""

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
