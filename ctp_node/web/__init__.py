"""The node's status page (and, where enabled, its STOW-RS endpoint), served inside `ctp-node serve`."""

from ctp_node.web.app import create_app
from ctp_node.web.server import WebServer, start_web

__all__ = ["WebServer", "create_app", "start_web"]
