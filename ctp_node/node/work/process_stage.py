"""The process stage: a claimed job's spooled series through the processor to a recorded result.

``ProcessStage`` runs the processor (``ctp_node.node.work.series_processor.make_processor``: the series
pipeline on a job's files) into the job's results folder (``ctp_node.node.shared.results``) and records
the result in the job store (state ``sending``), or the failure. The send stage
(``ctp_node.node.work.send_stage``) delivers a recorded result; the worker
(``ctp_node.node.work.worker``) runs one stage after the other.

What a processing failure does is decided in one place, ``FAULTS`` (see ``classify``). A retried
attempt waits as a failed delivery does (the retry policy, ``ctp_node.node.shared.retry``), up to
``jobs.max_attempts`` attempts.

A result is written into a hidden staging folder beside its generation's folder and renamed into
place only when the processor has finished: a failed attempt (a full disk, a crash) leaves no partial
result, and its staging folder is removed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ctp_node.config import Settings
from ctp_node.errors import ConfigError, CTPInputError, LeaseLost, NotCTPError, TransientError
from ctp_node.files import fsync_dir
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore, SeriesJob
from ctp_node.node.shared.notify import Notifier
from ctp_node.node.shared.prometheus import NodeMetrics
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.shared.retry import retry_at
from ctp_node.node.shared.spool import SeriesKey
from ctp_node.node.shared.storage import open_object_store, open_results, open_spool, scratch_folder
from ctp_node.node.work.progress import reporting_progress
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
        # With an object store, this host keeps nothing but its scratch folder: a job's series is
        # downloaded there, its result staged there and uploaded (ctp_node.node.shared.object_results).
        store = self.object_store = open_object_store(settings.storage)
        self.spool = open_spool(settings.storage, store)
        self.results = ResultsLayout.of(settings.storage)
        self.object_results = open_results(settings.storage, store)
        self.scratch = settings.storage.scratch_dir
        # Failed attempts the job store could not record (its disk full too): job id -> what to record.
        self.unrecorded: dict[int, tuple[str, datetime | None, bool]] = {}

    def process(self, job: SeriesJob) -> bool:
        """Process the job (leased to this worker); True when its result was recorded and waits to be sent."""
        started = time.perf_counter()
        staging = None
        work = None  # the job's scratch folder (object store only)
        output: ProcessOutput | None = None
        try:  # everything that can fail for this series goes through FAULTS, the spool and audit trail included
            key = SeriesKey(job.study_uid, job.series_uid)
            out_dir = self.results.generation_dir(job.study_uid, job.series_uid, job.generation)
            if self.object_results is None:
                files = self.spool.fetch(key, out_dir)  # the spool's own files, in place
                staging = _staging_dir(out_dir)
            else:
                work = scratch_folder(self.scratch, f"job-{job.id}")
                files = self.spool.fetch(key, work / "in")
                staging = make_dirs(work / "out")
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
            if self.object_results is None:
                # The generation's folder is shared by every attempt: renew the lease first, so that a
                # worker whose lease was taken (another attempt may have recorded, and be sending, that
                # folder) stops here with LeaseLost instead of replacing it. A renewed lease holds for
                # jobs.lease_s, far longer than the rename takes.
                self.store.heartbeat(job.id, self.worker_id, self.settings.jobs.lease_s)
                _publish(staging, out_dir)
                recorded = str(out_dir)
            else:  # every file uploaded before the job store hears of it: the record is the commit
                attempt = secrets.token_hex(6)  # this attempt's own keys: another may overlap it
                recorded = self.object_results.publish(staging, job.study_uid, job.series_uid, job.generation, attempt)
            if output.result_dir == staging:
                output = dataclasses.replace(output, result_dir=out_dir)
        except LeaseLost:
            _discard(staging)
            if output is not None:  # computed, then found the job taken: said in the audit trail
                seconds = time.perf_counter() - started
                self._audit_result(job, output, seconds, discarded="the lease was lost: another worker owns the job")
            raise
        except Exception as exc:
            _discard(staging)  # no partial result is left behind, whatever failed
            self._failed(job, exc)
            return False
        finally:
            _discard(work)  # a worker with an object store keeps nothing of a job
        seconds = time.perf_counter() - started
        self.metrics.processing.observe(seconds)
        if output.guardrail and not output.guardrail.startswith(("pass", "off")):
            log.warning("series %s: the guardrail %s (job %d)", job.series_uid, output.guardrail, job.id)
        try:
            moved = self.store.processed(
                job.id,
                self.worker_id,
                job.generation,
                recorded,
                seconds,
                [d.name for d in self.settings.destinations],
                guardrail=output.guardrail,
                warning=output.warning,
            )
        except LeaseLost:
            self._discard_upload(recorded)  # another worker owns the job: its result stays, ours goes
            self._audit_result(job, output, seconds, discarded="the lease was lost: another worker owns the job")
            raise
        except Exception as exc:  # the store cannot take the result: a failed attempt, retried (results are idempotent)
            self._discard_upload(recorded)
            self._failed(job, exc)
            return False
        # Written once the job store decided: an audit "processed" line is a result that will be sent.
        self._audit_result(job, output, seconds, discarded=None if moved else "the series changed while processing")
        if not moved:
            self._discard_upload(recorded)
            log.info("series %s changed while processing; it will be processed again", job.series_uid)
            return False
        if self.object_results is not None:
            try:  # attempts that uploaded and never recorded (lost lease, crash) leave objects behind
                self.object_results.keep_only(recorded, job.study_uid, job.series_uid, job.generation)
            except Exception as exc:  # noqa: BLE001 - housekeeping only: the result is recorded
                log.warning("job %d: could not remove other attempts' result objects: %s", job.id, exc)
        if output.warning:
            log.warning("series %s: %s (job %d)", job.series_uid, output.warning, job.id)
        return True

    def _audit_result(self, job: SeriesJob, output: ProcessOutput, seconds: float, *, discarded: str | None) -> None:
        self.audit.write(
            "processed" if discarded is None else "result discarded",
            series_uid=job.series_uid,
            worker=self.worker_id,
            generation=job.generation,
            instances=output.files,
            seconds=round(seconds, 3),
            guardrail=output.guardrail,
            **({"reason": discarded} if discarded else {}),
            **({"warning": output.warning} if output.warning else {}),
        )

    def _discard_upload(self, recorded: str) -> None:
        """Remove this attempt's uploaded result when the job store did not take it (object store only;
        a local result folder of the generation is replaced by the next attempt)."""
        if self.object_results is None:
            return
        try:
            self.object_results.discard(recorded)
        except Exception as exc:  # noqa: BLE001 - the recorded attempt's housekeeping removes it later
            log.warning("could not remove an unrecorded result at %s: %s", recorded, exc)

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
            recorded = self.store.failed(job_id, self.worker_id, error, retry_at=again, ignored=ignored)
            del self.unrecorded[job_id]
            if not recorded:  # the lease expired meanwhile: the job is queued again or another worker has it
                log.warning("job %d: the failed attempt (%s) was not recorded: this worker no longer holds the "
                            "job, which the job store gave to another attempt", job_id, error)  # fmt: skip
                continue
            outlook = f"queued again for {again:%H:%M:%S}" if again else ("ignored" if ignored else "failed")
            log.warning("job %d: the failed attempt is recorded now (%s): %s", job_id, outlook, error)

    def _tell_failed(self, job: SeriesJob, reason: str) -> None:
        """The ``job.failed`` webhook, with the job as the store now has it (failed or ignored)."""
        now = self.store.get(job.id)
        if now is not None:
            self.notifier.failed(now, reason)


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
