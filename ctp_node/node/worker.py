"""A worker: claims one series at a time, runs the processing stage, then the send stage.

One worker process per GPU, the model loaded once. The lease is renewed by a heartbeat thread; if
the worker dies, the lease expires and another worker takes the job over (at-least-once; results
are idempotent through deterministic UIDs). The two stages are apart: ``ProcessStage`` turns the
spooled series into a recorded result (state ``sending``); ``ctp_node.node.send.SendStage``
delivers a recorded result and never processes, so a send that failed is retried without
recomputing, by this worker or by a send stage running on its own.

What a processing failure does is decided in one place, ``FAULTS`` (see ``classify``). A retried
attempt waits as a failed delivery does (the ``[send]`` backoff: ``ctp_node.node.send.backoff_s``),
up to ``jobs.max_attempts`` attempts.

A result is written into a hidden staging folder beside its generation's folder and renamed into
place only when the processor has finished: a failed attempt (a full disk, a crash) leaves no partial
result, and its staging folder is removed. A failure outside any one job (the job store or its disk
unavailable) pauses the loop with a growing delay, up to ``jobs.error_backoff_max_s``, said once in
the log; a failed attempt the store could not record then is recorded when the store is back.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ctp_node.config import Settings
from ctp_node.errors import ConfigError, CTPInputError, LeaseLost, NotCTPError, TransientError
from ctp_node.files import fsync_dir, is_disk_full
from ctp_node.node.audit import AuditLog
from ctp_node.node.jobs import JobStore, SeriesJob, State, default_worker_id
from ctp_node.node.lease import Heartbeat
from ctp_node.node.notify import Notifier
from ctp_node.node.progress import reporting_progress
from ctp_node.node.prometheus import NodeMetrics
from ctp_node.node.send import ResultsLayout, Sender, SendStage, retry_at
from ctp_node.node.spool import SeriesKey, Spool
from ctp_node.permissions import make_dirs
from model.checkpoint import CheckpointError
from model.planner import PlanError

log = logging.getLogger(__name__)

STAGING_SUFFIX = ".part"  # ``.g<generation>.<random>.part``: a result being written (ctp_node.files likewise)


@dataclass(frozen=True)
class ProcessOutput:
    """What the pipeline wrote for one series generation."""

    result_dir: Path
    files: int
    guardrail: str | None = None  # the guardrail's verdict in one line ("pass: ...", "flagged: ...", "fallback: ...")
    warning: str | None = None  # what the job states was not made (e.g. "perfusion outputs not made: ...")


Processor = Callable[[SeriesJob, Sequence[Path], Path], ProcessOutput]


class Fault(str, enum.Enum):
    """What kind of failure ended a processing attempt (also the ``kind`` of ``ctp_node_job_failures``)."""

    NOT_CTP = "ignored"  # not a CT perfusion series: the job is ignored, not failed
    INPUT = "input"  # the series is wrong: failed at once with the reason, no traceback, never retried
    CONFIGURATION = "configuration"  # fix the configuration, then `ctp-node jobs retry`: failed, not retried
    TRANSIENT = "transient"  # disk, peer, network: retried with backoff up to jobs.max_attempts
    UNEXPECTED = "unexpected"  # anything else: retried like a transient fault, with its traceback logged


FAULTS: tuple[tuple[tuple[type[BaseException], ...], Fault], ...] = (
    ((NotCTPError,), Fault.NOT_CTP),  # before CTPInputError, of which it is one
    # model/ cannot import the node's errors, so its input errors are named here.
    ((CTPInputError, PlanError), Fault.INPUT),
    ((ConfigError, CheckpointError), Fault.CONFIGURATION),
    # OSError: disk full, a folder that cannot be written, a peer or socket that failed (ConnectionError,
    # TimeoutError); MemoryError: the host ran short while other work held memory; OperationalError:
    # the job store could not take the result (its disk full, the database unreachable).
    ((TransientError, OSError, MemoryError, OperationalError), Fault.TRANSIENT),
)
"""The one classification of processing failures: the first row whose classes match decides.

Anything no row names is ``UNEXPECTED`` and retried with backoff, its traceback logged. Failing it
at once would be wrong for the failures nobody foresaw that pass (a GPU shared with another
process running out of memory raises a plain RuntimeError), and would leave a patient's series
unprocessed until someone notices; retrying costs at most ``jobs.max_attempts`` runs, is safe
because results are idempotent, and the job still ends ``failed`` with the reason."""


def describe(exc: BaseException) -> str:
    """``exc`` in one line: a database error by what the database said, without SQLAlchemy's statement,
    parameters and documentation link (which also differ from one call to the next)."""
    if isinstance(exc, SQLAlchemyError) and getattr(exc, "orig", None) is not None:
        exc = exc.orig  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"


def classify(exc: BaseException) -> Fault:
    """The kind of fault ``exc`` is, by the first matching row of ``FAULTS``."""
    for classes, fault in FAULTS:
        if isinstance(exc, classes):
            return fault
    return Fault.UNEXPECTED


class ProcessStage:
    """Runs the processor on a claimed job's spooled files and records the result (or the failure)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        processor: Processor,
        *,
        audit: AuditLog,
        metrics: NodeMetrics,
        worker_id: str,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.audit = audit
        self.metrics = metrics
        self.worker_id = worker_id
        self.notifier = notifier
        self.spool = Spool(settings.storage.spool_dir)
        self.results = ResultsLayout.of(settings.storage)
        # Failed attempts the job store could not record (its disk full too): job id -> what to record.
        self.unrecorded: dict[int, tuple[str, datetime | None, bool]] = {}

    def process(self, job: SeriesJob) -> bool:
        """Process the job (leased to this worker); True when its result was recorded and waits to be sent."""
        started = time.perf_counter()
        staging = None
        try:  # everything that can fail for this series goes through FAULTS, the spool and audit trail included
            files = self.spool.instances(SeriesKey(job.study_uid, job.series_uid))
            out_dir = self.results.generation_dir(job.study_uid, job.series_uid, job.generation)
            staging = _staging_dir(out_dir)
            self.audit.write(
                "processing",
                series_uid=job.series_uid,
                worker=self.worker_id,
                attempt=job.attempts,
                generation=job.generation,
                instances=len(files),
            )
            with reporting_progress(self.store, job, self.worker_id):  # the status page shows progress and ETA
                output = self.processor(job, files, staging)
            _publish(staging, out_dir)
            if output.result_dir == staging:
                output = dataclasses.replace(output, result_dir=out_dir)
        except LeaseLost:
            _discard(staging)
            raise
        except Exception as exc:
            _discard(staging)  # no partial result is left behind, whatever failed
            self._failed(job, exc)
            return False
        seconds = time.perf_counter() - started
        self.metrics.processing.observe(seconds)
        if output.guardrail and not output.guardrail.startswith(("pass", "off")):
            log.warning("series %s: the guardrail %s (job %d)", job.series_uid, output.guardrail, job.id)
        self.audit.write(
            "processed",
            series_uid=job.series_uid,
            worker=self.worker_id,
            generation=job.generation,
            instances=output.files,
            seconds=round(seconds, 3),
            guardrail=output.guardrail,
            **({"warning": output.warning} if output.warning else {}),
        )
        try:
            moved = self.store.processed(
                job.id,
                self.worker_id,
                job.generation,
                str(output.result_dir),
                seconds,
                [d.name for d in self.settings.destinations],
                guardrail=output.guardrail,
                warning=output.warning,
            )
        except LeaseLost:
            raise
        except Exception as exc:  # the store cannot take the result: a failed attempt, retried (results are idempotent)
            self._failed(job, exc)
            return False
        if not moved:
            log.info("series %s changed while processing; it will be processed again", job.series_uid)
        elif output.warning:
            log.warning("series %s: %s (job %d)", job.series_uid, output.warning, job.id)
        return moved

    def _failed(self, job: SeriesJob, exc: Exception) -> None:
        """Record a failed attempt as ``FAULTS`` classifies it."""
        fault = classify(exc)
        reason = describe(exc)
        if fault is Fault.NOT_CTP:
            self._record(job, f"not CTP: {exc}", ignored=True)
            self.metrics.failures.labels(fault.value).inc()
            log.info("series %s ignored: %s", job.series_uid, exc)
            self._tell_failed(job, f"not CTP: {exc}")
            return
        if fault in (Fault.INPUT, Fault.CONFIGURATION):
            error = reason if fault is Fault.INPUT else f"configuration: {reason}"
            self._record(job, error)
            self.metrics.failures.labels(fault.value).inc()
            log.warning("series %s failed (%s fault, not retried): %s", job.series_uid, fault.value, reason)
            self._tell_failed(job, error)
            return
        again = retry_at(job.attempts, self.settings.jobs.max_attempts, self.settings.send)
        self._record(job, reason, retry_at=again)
        if again is None:
            self.metrics.failures.labels(fault.value).inc()
            self._tell_failed(job, reason)
        outlook = f"next try at {again:%H:%M:%S}" if again else "giving up"
        message = "processing series %s failed (attempt %d, %s fault; %s): %s"
        args = (job.series_uid, job.attempts, fault.value, outlook, reason)
        if fault is Fault.TRANSIENT:
            log.warning(message, *args)
        else:  # a bug or a failure FAULTS should learn: keep the traceback
            log.error(message, *args, exc_info=exc)

    def _record(self, job: SeriesJob, error: str, *, retry_at: datetime | None = None, ignored: bool = False) -> None:
        """Record the failed attempt; if the store cannot take it now, keep it for ``record_unrecorded``
        (else the job would stay "processing" until its lease expired) and raise for the worker loop."""
        try:
            self.store.failed(job.id, self.worker_id, error, retry_at=retry_at, ignored=ignored)
        except Exception:
            self.unrecorded[job.id] = (error, retry_at, ignored)
            raise
        self.unrecorded.pop(job.id, None)

    def record_unrecorded(self) -> None:
        """Record the failed attempts the job store could not take when they happened: the job goes
        back to the queue (or ends failed) with its reason. Raises while the store still cannot."""
        for job_id, (error, again, ignored) in list(self.unrecorded.items()):
            self.store.failed(job_id, self.worker_id, error, retry_at=again, ignored=ignored)
            del self.unrecorded[job_id]
            outlook = f"queued again for {again:%H:%M:%S}" if again else ("ignored" if ignored else "failed")
            log.warning("job %d: the failed attempt is recorded now (%s): %s", job_id, outlook, error)

    def _tell_failed(self, job: SeriesJob, reason: str) -> None:
        """The ``job.failed`` webhook, with the job as the store now has it (failed or ignored)."""
        now = self.store.get(job.id)
        if now is not None:
            self.notifier.failed(now, reason)


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
        self.audit = audit or AuditLog(settings.storage.audit_log)
        self.metrics = metrics or NodeMetrics()
        self.worker_id = worker_id or default_worker_id()
        # One notifier for both stages (one webhook thread); ``close()`` sends what is due before exit.
        self.notifier = notifier or Notifier(settings.notify, settings.dicom.ae_title, self.metrics.registry)
        shared = {"audit": self.audit, "metrics": self.metrics, "worker_id": self.worker_id, "notifier": self.notifier}
        self.processing = ProcessStage(settings, store, processor, **shared)
        self.sending = SendStage(settings, store, sender=sender, **shared)

    def run_once(self) -> SeriesJob | None:
        """Claim and run one job; None when nothing is runnable."""
        jobs = self.settings.jobs
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


def _staging_dir(out_dir: Path) -> Path:
    """A new, empty, hidden folder beside ``out_dir`` for the attempt to write into. Staging folders an
    earlier attempt left (a worker killed mid-write, or one whose lease was taken) are removed first:
    this worker holds the job's lease, so no one else may be writing them."""
    parent = make_dirs(out_dir.parent)
    for stale in parent.glob(f".{out_dir.name}.*{STAGING_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    return make_dirs(parent / f".{out_dir.name}.{secrets.token_hex(6)}{STAGING_SUFFIX}")


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``out_dir``: the result appears whole or not at all."""
    if out_dir.exists():  # an earlier attempt's result that was never recorded: this one replaces it
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)


def _discard(staging: Path | None) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
