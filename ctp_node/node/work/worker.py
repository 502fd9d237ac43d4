"""A worker: claims one series at a time, runs the process stage, then the send stage.

One worker process per GPU, the model loaded once. The lease is renewed by a heartbeat thread; if
the worker dies, the lease expires and another worker takes the job over (at-least-once; results
are idempotent through deterministic UIDs). The two stages are apart: ``ProcessStage``
(``ctp_node.node.work.process_stage``) turns the spooled series into a recorded result (state
``sending``); ``SendStage`` (``ctp_node.node.work.send_stage``) delivers a recorded result and never
processes, so a send that failed is retried without recomputing, by this worker or by a send stage
running on its own (``run_stage``).

A failure outside any one job (the job store or its disk unavailable) pauses the loop with a growing
delay, up to ``jobs.error_backoff_max_s``, said once in the log (``LoopTrouble``); a failed attempt
the store could not record then is recorded when the store is back.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from ctp_node.config import Settings
from ctp_node.errors import LeaseLost
from ctp_node.files import is_disk_full
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.health import free_bytes
from ctp_node.node.shared.jobs import JobStore, SeriesJob, State, default_worker_id
from ctp_node.node.shared.notify import Notifier
from ctp_node.node.shared.object_store import StoreUnavailable
from ctp_node.node.shared.prometheus import NodeMetrics
from ctp_node.node.work.lease import Heartbeat
from ctp_node.node.work.process_stage import Processor, ProcessStage, describe
from ctp_node.node.work.send_stage import Sender, SendStage
from ctp_node.permissions import make_dirs

log = logging.getLogger(__name__)


class Worker:
    """Claims jobs and runs them through the processing stage, then the send stage."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        processor: Processor,
        *,
        sender: Sender | None = None,
        audit: AuditLog | None = None,
        metrics: NodeMetrics | None = None,
        worker_id: str | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit or AuditLog(settings.storage.audit_log, store)
        self.metrics = metrics or NodeMetrics()
        self.worker_id = worker_id or default_worker_id()
        # One notifier for both stages (one webhook thread); ``close()`` sends what is due before exit.
        self.notifier = notifier or Notifier(settings.notify, settings.dicom.ae_title, self.metrics.registry)
        shared = {"audit": self.audit, "metrics": self.metrics, "worker_id": self.worker_id, "notifier": self.notifier}
        self.processing = ProcessStage(settings, store, processor, **shared)
        results = self.processing.object_results  # one object-store client (and bucket check) for both stages
        self.sending = SendStage(settings, store, sender=sender, object_results=results, **shared)

    def run_once(self) -> SeriesJob | None:
        """Claim and run one job; None when nothing is runnable."""
        jobs = self.settings.jobs
        self._check_scratch()
        if self.processing.object_store is not None:
            # A job claimed while the store is down would spend one of its attempts for nothing: the
            # loop waits instead (StoreUnavailable, said once, growing delay) until the store answers.
            self.processing.object_store.probe()
        job = self.store.claim(self.worker_id, jobs.lease_s)
        if job is None:
            return None
        log.info("claimed series %s (job %d, %s, attempt %d)", job.series_uid, job.id, job.state.value, job.attempts)
        try:
            with Heartbeat(self.store, job.id, self.worker_id, jobs.lease_s, jobs.heartbeat_s) as beat:
                if job.state == State.PROCESSING and not self.processing.process(job):
                    return job
                if beat.lost.is_set():
                    raise LeaseLost(f"lease of job {job.id} lost during processing")
                self.sending.deliver(job)
        except LeaseLost as exc:
            log.warning("%s; another worker owns the job now", exc)
        return job

    def _check_scratch(self) -> None:
        """With an object store a job is downloaded to the scratch folder: below ``storage.min_free_mb``
        there, claim nothing (OSError ENOSPC: the loop says "disk full" once and waits, growing)."""
        storage = self.settings.storage
        if storage.object_store is None or storage.min_free_mb <= 0:
            return
        free = free_bytes(make_dirs(storage.scratch_dir))
        if free < storage.min_free_mb << 20:
            raise OSError(
                errno.ENOSPC,
                f"scratch folder {storage.scratch_dir} has {free >> 20} MB free, below storage.min_free_mb "
                f"({storage.min_free_mb} MB): no job is claimed until there is room",
            )

    def close(self) -> None:
        """Send the webhooks that are due, then stop their thread."""
        self.notifier.close()

    def run_forever(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        """Run jobs until ``stop`` is set (``run_stage``)."""

        def one_pass() -> SeriesJob | None:
            self.processing.record_unrecorded()
            return self.run_once()

        run_stage(one_pass, stop, idle_s, self.settings.jobs.error_backoff_max_s)


def run_stage(run_once: Callable[[], SeriesJob | None], stop: threading.Event, idle_s: float, max_s: float) -> None:
    """Call ``run_once`` until ``stop`` is set: the loop of a worker, and of a send stage on its own
    (``ctp-node worker --send-only``: ``SendStage.run_once``). Idle for ``idle_s`` when it found nothing
    to do. A failure outside any one job (the job store or its disk) is said once and waited out with a
    growing delay, up to ``max_s`` (``LoopTrouble``); ``stop`` ends every wait at once."""
    trouble = LoopTrouble(idle_s, max_s)
    while not stop.is_set():
        try:
            ran = run_once()
        except Exception as exc:
            stop.wait(trouble.failed(exc))
            continue
        trouble.recovered()
        if ran is None:
            stop.wait(idle_s)


class LoopTrouble:
    """The worker loop's failures that no job's record took: how long to wait, and what to log.

    The first failure of a kind (its exception class, and whether the disk is full) is logged as one
    line; a full disk or an unavailable job store, whose reason the line says, without a traceback.
    Repeats are logged at debug level only, and the delay doubles from ``first_s`` up to ``max_s``.
    The first pass that succeeds again logs once that the worker resumed (issue 23: a traceback a
    second for as long as the disk was full)."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max(max_s, first_s)
        self.failures = 0
        self.kind: tuple[str, bool] | None = None
        self.since = 0.0

    def failed(self, exc: BaseException) -> float:
        """The delay before the next pass, after ``exc`` ended this one."""
        self.failures += 1
        delay = min(self.first_s * 2 ** min(self.failures - 1, 30), self.max_s)
        full = is_disk_full(exc)
        kind = (type(exc).__qualname__, full)
        if kind == self.kind:
            log.debug("worker loop: failed %d times: %s; next pass in %.0f s", self.failures, describe(exc), delay)
            return delay
        if self.kind is None:
            self.since = time.monotonic()
        self.kind = kind
        if full:
            log.error(
                "worker paused: the disk is full (%s); trying again with a growing delay, up to %.0f s",
                describe(exc), self.max_s,
            )  # fmt: skip
        elif isinstance(exc, StoreUnavailable):
            log.error(
                "worker paused: the object store is unavailable (%s); trying again with a growing delay, up to %.0f s",
                exc, self.max_s,
            )  # fmt: skip
        elif isinstance(exc, SQLAlchemyError):
            log.error(
                "worker paused: the job store is unavailable (%s); trying again with a growing delay, up to %.0f s",
                describe(exc), self.max_s,
            )  # fmt: skip
        else:  # a bug: its traceback, once
            log.error("worker loop error (%s); trying again with a growing delay, up to %.0f s", describe(exc),
                      self.max_s, exc_info=exc)  # fmt: skip
        return delay

    def recovered(self) -> None:
        if self.kind is not None:
            log.warning(
                "worker resumed after %d failed passes over %.0f s", self.failures, time.monotonic() - self.since
            )
        self.failures, self.kind = 0, None
