"""A worker: claims one series at a time, processes it from the spool, delivers the result.

One worker process per GPU, the model loaded once. The lease is renewed by a heartbeat thread; if
the worker dies, the lease expires and another worker takes the job over (at-least-once; results
are idempotent through deterministic UIDs). Input errors end a job at once (failed, or ignored for
a series that is not CTP); other errors are retried with backoff up to ``jobs.max_attempts``. A
failed send is a value the retry policy consumes (``delivery_failed`` with the next attempt time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ctp_node.config import Destination, SendSettings, Settings
from ctp_node.errors import CTPInputError, NotCTPError
from ctp_node.node.audit import AuditLog
from ctp_node.node.jobs import JobStore, LeaseLost, SeriesJob, State, default_worker_id, utcnow
from ctp_node.node.prometheus import NodeMetrics
from ctp_node.node.scu import Peer, SendResult, send_files
from ctp_node.node.spool import SeriesKey, Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOutput:
    """What the pipeline wrote for one series generation."""

    result_dir: Path
    files: int
    guardrail: str | None = None  # the guardrail's verdict in one line ("pass: ...", "flagged: ...", "fallback: ...")


Processor = Callable[[SeriesJob, Sequence[Path], Path], ProcessOutput]
Sender = Callable[[Sequence[Path], Peer, str], list[SendResult]]


def backoff_s(attempt: int, policy: SendSettings) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): initial * multiplier^(attempt-1), capped."""
    return min(policy.initial_backoff_s * policy.backoff_multiplier ** max(attempt - 1, 0), policy.max_backoff_s)


class _Heartbeat:
    """Renews the lease in the background; remembers if it was lost."""

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

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
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
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.sender = sender or (lambda files, peer, aet: send_files(files, peer, aet))
        self.audit = audit or AuditLog(settings.storage.audit_log)
        self.metrics = metrics or NodeMetrics()
        self.worker_id = worker_id or default_worker_id()
        self.spool = Spool(settings.storage.spool_dir)
        self.destinations = {d.name: d for d in settings.destinations}

    def run_once(self) -> SeriesJob | None:
        """Claim and run one job; None when nothing is runnable."""
        jobs = self.settings.jobs
        job = self.store.claim(self.worker_id, jobs.lease_s)
        if job is None:
            return None
        log.info("claimed series %s (job %d, %s, attempt %d)", job.series_uid, job.id, job.state.value, job.attempts)
        try:
            with _Heartbeat(self.store, job.id, self.worker_id, jobs.lease_s, jobs.heartbeat_s) as beat:
                if job.state == State.PROCESSING and not self._process(job):
                    return job
                if beat.lost.is_set():
                    raise LeaseLost(f"lease of job {job.id} lost during processing")
                self._deliver(job)
        except LeaseLost as exc:
            log.warning("%s; another worker owns the job now", exc)
        return job

    def run_forever(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                log.exception("worker loop error; continuing")
                ran = None
            if ran is None:
                stop.wait(idle_s)

    def _process(self, job: SeriesJob) -> bool:
        """Run the pipeline; True when the job moves on to sending."""
        files = self.spool.instances(SeriesKey(job.study_uid, job.series_uid))
        out_dir = self.settings.storage.results_dir / job.study_uid / job.series_uid / f"g{job.generation}"
        self.audit.write(
            "processing",
            series_uid=job.series_uid,
            worker=self.worker_id,
            attempt=job.attempts,
            generation=job.generation,
            instances=len(files),
        )
        started = time.perf_counter()
        try:
            output = self.processor(job, files, out_dir)
        except NotCTPError as exc:
            self.store.failed(job.id, self.worker_id, f"not CTP: {exc}", ignored=True)
            self.metrics.failures.labels("ignored").inc()
            log.info("series %s ignored: %s", job.series_uid, exc)
            return False
        except CTPInputError as exc:
            self.store.failed(job.id, self.worker_id, f"{type(exc).__name__}: {exc}")
            self.metrics.failures.labels("input").inc()
            log.warning("series %s failed: %s", job.series_uid, exc)
            return False
        except LeaseLost:
            raise
        except Exception as exc:
            retry_at = None
            if job.attempts < self.settings.jobs.max_attempts:
                retry_at = utcnow() + timedelta(seconds=backoff_s(job.attempts, self.settings.send))
            self.store.failed(job.id, self.worker_id, f"{type(exc).__name__}: {exc}", retry_at=retry_at)
            log.exception("processing series %s failed (attempt %d)", job.series_uid, job.attempts)
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
        )
        moved = self.store.processed(
            job.id,
            self.worker_id,
            job.generation,
            str(output.result_dir),
            seconds,
            list(self.destinations),
            guardrail=output.guardrail,
        )
        if not moved:
            log.info("series %s changed while processing; it will be processed again", job.series_uid)
        return moved

    def _deliver(self, job: SeriesJob) -> None:
        current = self.store.get(job.id)
        if current is None or current.result_dir is None:
            return
        files = sorted(Path(current.result_dir).glob("*.dcm"))
        now = utcnow()
        for delivery in self.store.pending_deliveries(job.id):
            if delivery.next_attempt_at is not None and delivery.next_attempt_at > now:
                continue
            destination = self.destinations.get(delivery.destination)
            if destination is None:
                self.store.delivery_failed(delivery.id, f"destination {delivery.destination!r} is not configured", None)
                continue
            error = self._send(files, destination)
            if error is None:
                self.store.delivery_sent(delivery.id, len(files))
                self.metrics.sent.labels(destination.name).inc()
                self.audit.write(
                    "sent",
                    study_uid=job.study_uid,
                    source_series_uid=job.series_uid,
                    destination=destination.name,
                    ae_title=destination.ae_title,
                    host=destination.host,
                    instances=len(files),
                    generation=current.result_generation,
                )
                continue
            attempt = delivery.attempts + 1
            retry_at: datetime | None = None
            if attempt < self.settings.send.max_attempts:
                retry_at = utcnow() + timedelta(seconds=backoff_s(attempt, self.settings.send))
            self.store.delivery_failed(delivery.id, error, retry_at)
            self.metrics.send_failures.labels(destination.name).inc()
            log.warning(
                "sending %s to %s failed (attempt %d): %s%s",
                job.series_uid,
                destination.name,
                attempt,
                error,
                f"; next try at {retry_at:%H:%M:%S}" if retry_at else "; giving up",
            )
        state = self.store.finish_sending(job.id, self.worker_id)
        log.info("series %s: %s", job.series_uid, state.value)

    def _send(self, files: Sequence[Path], destination: Destination) -> str | None:
        """None on success, else the reason (never raises for network trouble)."""
        if not files:
            return "no result files to send"
        peer = Peer(destination.host, destination.port, destination.ae_title)
        try:
            results = self.sender(files, peer, self.settings.dicom.ae_title)
        except (ConnectionError, OSError, RuntimeError) as exc:
            return str(exc)
        failed = [r for r in results if not r.ok]
        if failed or len(results) != len(files):
            statuses = sorted({hex(r.status) if r.status is not None else "no response" for r in failed})
            return f"{len(failed)} of {len(files)} instances refused ({', '.join(statuses)})"
        return None
