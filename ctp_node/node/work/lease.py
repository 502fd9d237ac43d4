"""Holding a job's lease while a stage works on it: a heartbeat thread renews it, and says if it was lost."""

from __future__ import annotations

import logging
import threading

from ctp_node.errors import LeaseLost
from ctp_node.node.shared.jobs import JobStore

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the lease of ``job_id`` every ``every_s`` in the background; ``lost`` is set if another worker took it."""

    def __init__(self, store: JobStore, job_id: int, worker: str, lease_s: float, every_s: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(store, job_id, worker, lease_s, every_s), daemon=True, name=f"heartbeat-{job_id}"
        )

    def _run(self, store: JobStore, job_id: int, worker: str, lease_s: float, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                store.heartbeat(job_id, worker, lease_s)
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:  # a database hiccup: try again next beat, the lease has slack
                log.warning("heartbeat of job %d failed: %s", job_id, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
