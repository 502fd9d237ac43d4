"""An ASGI app served by uvicorn on a loopback port, in a thread: the one way the tests serve HTTP for real."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tests.peers import wait_for
from tests.ports import free_port


@contextlib.contextmanager
def served_by_uvicorn(app, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` on ``127.0.0.1`` and yield its base URL (``http://127.0.0.1:<port>``); stopped on exit."""
    import uvicorn  # only the tests that serve for real need it

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:

        def started() -> bool:
            # a server that failed to start ends its thread: say so instead of waiting out the timeout
            assert thread.is_alive(), "uvicorn did not start (its thread ended)"
            return server.started

        wait_for(started, start_timeout_s, "uvicorn to start", interval=0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
