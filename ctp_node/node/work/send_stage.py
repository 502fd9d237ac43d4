"""The send stage: deliver a processed series' result to its destinations, and nothing else.

A job whose result is recorded (state ``sending``) is delivered by this stage alone: the worker
runs it right after processing, and ``SendStage.run_once`` claims only jobs that wait to be sent
(``ctp-node worker --send-only``: delivery without a model, e.g. after a destination was down), so a
failed send is tried again later without recomputing anything. Every sender of results (this stage,
``ctp-node process --send``) sends ``ResultsLayout.files`` (``ctp_node.node.shared.results``, where
the results folder's layout is spelled) with ``send_attempt``: one send path. A failed send is a value
the retry policy consumes (``delivery_failed`` with the next attempt time,
``ctp_node.node.shared.retry``), never an exception out of the stage.

Delivery records: one row per (series, destination) in the job store's ``deliveries`` table (state,
attempts, next attempt, last error), and the files each destination confirmed (``sent_instances``,
recorded as each answer arrives): a delivery cut off half way (an association that drops, a worker
that is killed) is retried with only the files not yet confirmed. What went out, when and where: the
audit trail's ``sent`` lines. The transports: C-STORE (``ctp_node.node.work.scu``) and STOW-RS
(``ctp_node.node.work.stow_client``).
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ctp_node.config import Destination, DicomSettings, Settings
from ctp_node.errors import ConfigError, LeaseLost
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore, SeriesJob, State, default_worker_id, utcnow
from ctp_node.node.shared.notify import Notifier
from ctp_node.node.shared.object_results import ObjectResults
from ctp_node.node.shared.object_store import is_uri
from ctp_node.node.shared.peer import Peer
from ctp_node.node.shared.prometheus import NodeMetrics
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.shared.retry import retry_at
from ctp_node.node.shared.storage import open_object_store, open_results, scratch_folder
from ctp_node.node.work.lease import Heartbeat
from ctp_node.node.work.scu import SendResult, send_files

log = logging.getLogger(__name__)

Sender = Callable[[Sequence[Path], Destination, str], list[SendResult]]
"""Sends files to a destination (calling AE title for DICOM peers); one result per file (``send_to``)."""


# --- peers ------------------------------------------------------------------------------------------


def peer_for(destination: Destination) -> Peer:
    """The DICOM peer of a configured destination; ValueError for a DICOMweb one (it has a URL, no peer)."""
    if destination.kind != "dimse" or destination.host is None or destination.port is None:
        raise ValueError(
            f"destination {destination.name!r} is a DICOMweb service ({destination.url}), not a DICOM peer: "
            "C-ECHO, C-STORE and C-GET need a destination of kind dimse"
        )
    return Peer(destination.host, destination.port, destination.ae_title or "")


def find_destination(destinations: Sequence[Destination], target: str) -> Destination:
    """A configured destination by name (either kind), else a DICOM peer given as ``HOST:PORT:AET``;
    ValueError naming both forms."""
    for destination in destinations:
        if destination.name == target:
            return destination
    try:
        peer = Peer.parse(target)
    except ValueError as exc:
        names = ", ".join(d.name for d in destinations) or "none configured"
        raise ValueError(f"{target!r} is neither a configured destination ({names}) nor HOST:PORT:AET: {exc}") from exc
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", target)[:64]  # a destination name allows no colon
    return Destination(name=name, host=peer.host, port=peer.port, ae_title=peer.ae_title)


def find_peer(destinations: Sequence[Destination], target: str) -> Peer:
    """A configured destination by name, else ``HOST:PORT:AET``; ValueError naming both forms."""
    for destination in destinations:
        if destination.name == target:
            return peer_for(destination)
    try:
        return Peer.parse(target)
    except ValueError as exc:
        names = ", ".join(d.name for d in destinations) or "none configured"
        raise ValueError(f"{target!r} is neither a configured destination ({names}) nor HOST:PORT:AET: {exc}") from exc


# --- the stage --------------------------------------------------------------------------------------


def send_to(
    files: Sequence[Path],
    destination: Destination,
    calling_ae_title: str,
    *,
    dicom: DicomSettings | None = None,
    on_result: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``files`` to a destination of either kind: C-STORE to a DICOM peer (with the ACSE, DIMSE and
    network timeouts of ``dicom``, the node's ``[dicom]`` settings), STOW-RS to a DICOMweb service."""
    if destination.kind == "dicomweb":
        # requests and dicomweb-client: imported only for this kind
        from ctp_node.node.work.stow_client import send_files_dicomweb

        results = send_files_dicomweb(files, destination)
        for result in results if on_result else ():
            on_result(result)
        return results
    dicom = dicom or DicomSettings()
    return send_files(
        files,
        peer_for(destination),
        calling_ae_title,
        timeout_s=dicom.network_timeout_s,
        dimse_timeout_s=dicom.dimse_timeout_s,
        acse_timeout_s=dicom.acse_timeout_s,
        on_result=on_result,
    )


def send_attempt(
    files: Sequence[Path],
    destination: Destination,
    calling_ae_title: str,
    *,
    dicom: DicomSettings | None = None,
    sender: Sender | None = None,
    on_result: Callable[[SendResult], None] | None = None,
) -> tuple[list[SendResult], str | None]:
    """One attempt to send ``files`` to one destination, as every sender of results makes it (the send
    stage, ``ctp-node process --send``): what the destination answered, and None when it confirmed every
    file, else the reason. A failed send is a value, never an exception.

    ``sender`` replaces ``send_to`` (tests, or a caller with its own transport); ``on_result`` hears
    each answer as it arrives (``send_to`` only)."""
    try:
        if sender is None:
            results = send_to(files, destination, calling_ae_title, dicom=dicom, on_result=on_result)
        else:
            results = sender(files, destination, calling_ae_title)
    except (OSError, RuntimeError) as exc:  # no association, refused contexts, timeouts, a peer that aborts
        return [], str(exc) or type(exc).__name__
    except Exception as exc:  # unforeseen: still a failed attempt (bounded by send.max_attempts), with its trace
        log.exception("sending to %s failed unexpectedly", destination.name)
        return [], f"{type(exc).__name__}: {exc}"
    return results, refusal(files, results)


def refusal(files: Sequence[Path], results: Sequence[SendResult]) -> str | None:
    """None when the peer stored every file, else what went wrong, with the statuses it answered."""
    failed = [r for r in results if not r.ok]
    unanswered = max(len(files) - len(results), 0)
    if not failed and not unanswered:
        return None
    statuses = sorted({hex(r.status) if r.status is not None else "no response" for r in failed})
    if unanswered and "no response" not in statuses:
        statuses.append("no response")
    return f"{len(failed) + unanswered} of {len(files)} instances refused ({', '.join(statuses)})"


class SendStage:
    """Delivers recorded results to the configured destinations; never processes anything."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        sender: Sender | None = None,
        audit: AuditLog | None = None,
        metrics: NodeMetrics | None = None,
        worker_id: str | None = None,
        notifier: Notifier | None = None,
        object_results: ObjectResults | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sender: Sender | None = sender  # None: send_to, with the node's timeouts
        self.audit = audit or AuditLog(settings.storage.audit_log, store)
        self.metrics = metrics or NodeMetrics()
        self.worker_id = worker_id or default_worker_id()
        # Webhooks: none configured costs nothing (no thread); the caller owns and closes a given one.
        self.notifier = notifier or Notifier(settings.notify, settings.dicom.ae_title, self.metrics.registry)
        self.destinations = {d.name: d for d in settings.destinations}
        # Results recorded as s3:// addresses are downloaded to the scratch folder for each pass. A worker
        # passes its process stage's (one client, one bucket check at start); a send-only stage opens its own.
        self.object_results = object_results or open_results(settings.storage, open_object_store(settings.storage))

    def run_once(self) -> SeriesJob | None:
        """Claim one job whose result waits to be sent and deliver it; None when none is due."""
        jobs = self.settings.jobs
        job = self.store.claim(self.worker_id, jobs.lease_s, sending_only=True)
        if job is None:
            return None
        log.info("claimed series %s for sending (job %d)", job.series_uid, job.id)
        try:
            with Heartbeat(self.store, job.id, self.worker_id, jobs.lease_s, jobs.heartbeat_s):
                self.deliver(job)
        except LeaseLost as exc:
            log.warning("%s; another worker owns the job now", exc)
        return job

    def deliver(self, job: SeriesJob) -> State:
        """One sending pass over the job's due deliveries (the job must be leased to this worker)."""
        current = self.store.get(job.id)
        if current is None or current.result_dir is None:
            return current.state if current else State.FAILED
        work = None
        if is_uri(current.result_dir):  # in the object store: this pass sends a downloaded copy
            if self.object_results is None:
                raise ConfigError(
                    f"job {job.id}'s result is in an object store ({current.result_dir}), but storage.object_store "
                    "is not configured on this host"
                )
            work = scratch_folder(self.settings.storage.scratch_dir, f"send-{job.id}")
            root = self.object_results.fetch(current.result_dir, work)
        else:
            root = Path(current.result_dir)
        try:
            return self._deliver(job, current, root)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def _deliver(self, job: SeriesJob, current: SeriesJob, root: Path) -> State:
        files = ResultsLayout.files(root)
        now = utcnow()
        # The webhooks go out after the pass, with the job as the pass leaves it: the last
        # destination's result.delivered then says done (not "sending"), a given-up one says failed.
        delivered: list[tuple[str, int]] = []
        given_up: list[tuple[str, str]] = []
        try:
            for delivery in self.store.pending_deliveries(job.id):
                if delivery.next_attempt_at is not None and delivery.next_attempt_at > now:
                    continue
                destination = self.destinations.get(delivery.destination)
                if destination is None:
                    reason = f"destination {delivery.destination!r} is not configured"
                    self.store.delivery_failed(delivery.id, reason, None)
                    given_up.append((delivery.destination, reason))
                    continue
                error = self._send(files, destination, delivery.id, root)
                if error is None:
                    self.store.delivery_sent(delivery.id, len(files))
                    self.metrics.sent.labels(destination.name).inc()
                    delivered.append((destination.name, len(files)))
                    self.audit.write(
                        "sent",
                        study_uid=job.study_uid,
                        source_series_uid=job.series_uid,
                        destination=destination.name,
                        **_where(destination),
                        instances=len(files),
                        generation=current.result_generation,
                    )
                    continue
                attempt = delivery.attempts + 1
                again = retry_at(attempt, self.settings.send.max_attempts, self.settings.send)
                self.store.delivery_failed(delivery.id, error, again)
                self.metrics.send_failures.labels(destination.name).inc()
                if again is None:
                    given_up.append((destination.name, f"sending to {destination.name} given up: {error}"))
                log.warning(
                    "sending %s to %s failed (attempt %d): %s%s",
                    job.series_uid,
                    destination.name,
                    attempt,
                    error,
                    f"; next try at {again:%H:%M:%S}" if again else "; giving up",
                )
            state = self.store.finish_sending(job.id, self.worker_id)
        finally:  # a pass cut short still tells what it delivered
            self._tell(job, delivered, given_up)
        log.info("series %s: %s", job.series_uid, state.value)
        return state

    def _tell(self, job: SeriesJob, delivered: list[tuple[str, int]], given_up: list[tuple[str, str]]) -> None:
        """The pass's webhooks, with the job as the store has it now; queuing one never fails or delays
        a delivery. ``job.delivered`` once the pass has left the job done: every destination has it."""
        if not delivered and not given_up:
            return
        now = self.store.get(job.id)
        if now is None:
            return
        for destination, instances in delivered:
            self.notifier.result_delivered(now, destination, instances)
        for destination, reason in given_up:
            self.notifier.failed(now, reason, destination=destination)
        if delivered and now.state is State.DONE:
            self.notifier.job_delivered(now, sorted(d.destination for d in self.store.deliveries(job.id)))

    def _send(self, files: Sequence[Path], destination: Destination, delivery_id: int, root: Path) -> str | None:
        """Send the files the destination has not confirmed yet, recording each one it confirms: None
        once all are confirmed, else the reason; a failed send is a value, never an exception."""
        if not files:
            return "no result files to send"

        def name(path: Path) -> str:
            return path.relative_to(root).as_posix()

        confirmed = self.store.confirmed_files(delivery_id)
        todo = [f for f in files if name(f) not in confirmed]
        if not todo:
            return None
        if len(todo) < len(files):
            earlier = len(files) - len(todo)
            log.info("%s confirmed %d of %d files earlier: sending the rest", destination.name, earlier, len(files))

        aet, dicom = self.settings.dicom.ae_title, self.settings.dicom
        if self.sender is None:  # each confirmation recorded as it arrives: a killed worker resends only the rest
            with _Confirmations(self.store, delivery_id, name) as record:
                results, error = send_attempt(todo, destination, aet, dicom=dicom, on_result=record)
        else:
            results, error = send_attempt(todo, destination, aet, sender=self.sender)
        # What the destination confirmed counts even when the rest failed (repeats are ignored).
        self.store.confirm_files(delivery_id, [name(r.path) for r in results if r.ok])
        return error


class _Confirmations:
    """Records the files a destination confirms while a delivery runs, off the sending thread.

    One transaction per ``linger_s`` at most, with every answer that arrived meanwhile: a worker killed
    half way resends the instance in flight and the answers of the last ``linger_s`` (a few), and the
    C-STOREs never wait on the job store. Measured on 488 files to a default storescp (2 loaded cores):
    a commit per answer made the delivery 27 % slower (4.56 s against 3.60 s), 20 ms or 50 ms none
    measurably. A store that fails here costs only repeats: the stage records every confirmed file
    again when the sender returns.
    """

    linger_s = 0.02

    def __init__(self, store: JobStore, delivery_id: int, name: Callable[[Path], str]) -> None:
        self.store, self.delivery_id, self.name = store, delivery_id, name
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"confirmations-{delivery_id}")

    def __call__(self, result: SendResult) -> None:
        if result.ok:
            self._queue.put(self.name(result.path))

    def __enter__(self) -> _Confirmations:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        done = False
        while not done:
            files = [self._queue.get()]
            if files[0] is not None:
                time.sleep(self.linger_s)
            while not self._queue.empty():
                files.append(self._queue.get())
            done = None in files
            try:
                self.store.confirm_files(self.delivery_id, [f for f in files if f is not None])
            except Exception as exc:
                log.warning("could not record confirmed files of delivery %d yet: %s", self.delivery_id, exc)


def _where(destination: Destination) -> dict[str, str | None]:
    """The audit trail's record of where a destination is."""
    if destination.kind == "dicomweb":
        return {"url": destination.url}
    return {"ae_title": destination.ae_title, "host": destination.host}
