"""A job's processing progress, recorded in the job store for the status page.

The engine reports ``progress(done, total)`` after every network evaluation; the processor
(``ctp_node.node.work.series_processor``) passes it on to the reporter the process stage set for the
job it runs (``reporting_progress``), which writes it into the job's row at a bounded rate with an ETA.
A light module (no torch): the process stage imports it whether or not it processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ctp_node.node.shared.jobs import JobStore, SeriesJob

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
"""At most one job-store write per this many seconds per job (plus the first and the last): the engine
reports every network evaluation, many a second, and a page refreshed every few seconds needs no more."""


class StoreProgress:
    """A ``progress(done, total)`` callback that records the job's progress and ETA in the job store.

    Writes the first call (the page shows the job started), then at most one every ``every_s``, and the
    last (done == total). The ETA is the elapsed time scaled by the work left (the engine's steps take
    about the same time each). A write that fails is logged once and never fails the job: progress is
    a courtesy, the result is not."""

    def __init__(
        self,
        store: JobStore,
        job: SeriesJob,
        worker: str,
        *,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.job, self.worker = store, job, worker
        self.every_s, self.clock = every_s, clock
        self.started = clock()
        self._last: float | None = None
        self._warned = False
        self.writes = 0

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        now = self.clock()
        last = done >= total
        if self._last is not None and not last and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        eta_s = elapsed * (total - done) / done if done > 0 else None
        try:
            self.store.record_progress(self.job.id, self.worker, self.job.generation, done, total, eta_s)
            self.writes += 1
        except Exception as exc:  # a store that hiccups: the next write may pass; the job goes on
            if not self._warned:
                log.warning("job %d: could not record its progress: %s", self.job.id, exc)
                self._warned = True


_reporter: ContextVar[StoreProgress | None] = ContextVar("ctp_node_progress_reporter", default=None)


@contextmanager
def reporting_progress(store: JobStore, job: SeriesJob, worker: str) -> Iterator[StoreProgress]:
    """While inside, the processor made by ``make_processor`` also records its progress in ``store``
    (the processor's signature stays (job, files, out_dir): the worker says where, not the caller)."""
    reporter = StoreProgress(store, job, worker)
    token = _reporter.set(reporter)
    try:
        yield reporter
    finally:
        _reporter.reset(token)


def current_reporter() -> StoreProgress | None:
    """The reporter of the job this thread processes (``reporting_progress``), if any."""
    return _reporter.get()
