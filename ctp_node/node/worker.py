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
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctp_node.config import Settings
from ctp_node.errors import ConfigError, CTPInputError, LeaseLost, NotCTPError, TransientError
from ctp_node.node.audit import AuditLog
from ctp_node.node.jobs import JobStore, SeriesJob, State, default_worker_id
from ctp_node.node.lease import Heartbeat
from ctp_node.node.notify import Notifier
from ctp_node.node.prometheus import NodeMetrics
from ctp_node.node.send import ResultsLayout, Sender, SendStage, retry_at
from ctp_node.node.spool import SeriesKey, Spool
from model.checkpoint import CheckpointError
from model.planner import PlanError

log = logging.getLogger(__name__)


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
    # TimeoutError); MemoryError: the host ran short while other work held memory.
    ((TransientError, OSError, MemoryError), Fault.TRANSIENT),
)
"""The one classification of processing failures: the first row whose classes match decides.

Anything no row names is ``UNEXPECTED`` and retried with backoff, its traceback logged. Failing it
at once would be wrong for the failures nobody foresaw that pass (a GPU shared with another
process running out of memory raises a plain RuntimeError), and would leave a patient's series
unprocessed until someone notices; retrying costs at most ``jobs.max_attempts`` runs, is safe
because results are idempotent, and the job still ends ``failed`` with the reason."""


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

    def process(self, job: SeriesJob) -> bool:
        """Process the job (leased to this worker); True when its result was recorded and waits to be sent."""
        started = time.perf_counter()
        try:  # everything that can fail for this series goes through FAULTS, the spool and audit trail included
            files = self.spool.instances(SeriesKey(job.study_uid, job.series_uid))
            out_dir = self.results.generation_dir(job.study_uid, job.series_uid, job.generation)
            self.audit.write(
                "processing",
                series_uid=job.series_uid,
                worker=self.worker_id,
                attempt=job.attempts,
                generation=job.generation,
                instances=len(files),
            )
            output = self.processor(job, files, out_dir)
        except LeaseLost:
            raise
        except Exception as exc:
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
        if not moved:
            log.info("series %s changed while processing; it will be processed again", job.series_uid)
        elif output.warning:
            log.warning("series %s: %s (job %d)", job.series_uid, output.warning, job.id)
        return moved

    def _failed(self, job: SeriesJob, exc: Exception) -> None:
        """Record a failed attempt as ``FAULTS`` classifies it."""
        fault = classify(exc)
        reason = f"{type(exc).__name__}: {exc}"
        if fault is Fault.NOT_CTP:
            self.store.failed(job.id, self.worker_id, f"not CTP: {exc}", ignored=True)
            self.metrics.failures.labels(fault.value).inc()
            log.info("series %s ignored: %s", job.series_uid, exc)
            self._tell_failed(job, f"not CTP: {exc}")
            return
        if fault in (Fault.INPUT, Fault.CONFIGURATION):
            error = reason if fault is Fault.INPUT else f"configuration: {reason}"
            self.store.failed(job.id, self.worker_id, error)
            self.metrics.failures.labels(fault.value).inc()
            log.warning("series %s failed (%s fault, not retried): %s", job.series_uid, fault.value, reason)
            self._tell_failed(job, error)
            return
        again = retry_at(job.attempts, self.settings.jobs.max_attempts, self.settings.send)
        self.store.failed(job.id, self.worker_id, reason, retry_at=again)
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
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                log.exception("worker loop error; continuing")
                ran = None
            if ran is None:
                stop.wait(idle_s)
