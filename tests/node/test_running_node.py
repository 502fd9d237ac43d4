"""The test harness's ``RunningNode``: a port taken between choosing and binding it is chosen again."""

from __future__ import annotations

import socket

import tests.integration.node_helpers as node_helpers
from tests.node.running_node import RunningNode
from tests.ports import free_port


def test_a_node_whose_port_was_taken_starts_on_another(tmp_path, monkeypatch):
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen()
    taken = stranger.getsockname()[1]
    ports = iter([taken])
    # The first DICOM port handed to the node is the stranger's; the next ones are free.
    monkeypatch.setattr(node_helpers, "free_port", lambda: next(ports, None) or free_port())
    node = None
    try:
        node = RunningNode(tmp_path, timeout_s=5.0)
        assert node.port != taken
        assert node.echo()  # the node, not the stranger, answers on its port
        assert f"cannot listen on 127.0.0.1:{taken}" in node.log.read_text()
    finally:
        if node is not None:
            node.stop()
        stranger.close()
