"""The node's status page (and, where enabled, its STOW-RS endpoint), served inside `ctp-node serve`.

The names below are imported on first use, not with the package: `python -m ctp_node.web.passwords`
would otherwise find its own module already imported by this package (through the app and its
authentication) and runpy warns about that, and the password tool needs none of the web server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctp_node.web.app import create_app
    from ctp_node.web.server import WebServer, start_web

__all__ = ["WebServer", "create_app", "start_web"]

_HOMES = {"create_app": "ctp_node.web.app", "WebServer": "ctp_node.web.server", "start_web": "ctp_node.web.server"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
