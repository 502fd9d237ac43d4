"""The receiving process: SCP into the spool, a row per series, and the completion watcher.

Never touches the GPU. The spool is the record of what was received: an instance is acknowledged
once its file is durable, and the job store and audit trail are updated from a queue by one writer
thread in batches (a database round trip per instance would slow every sender, and a database
outage must not stop a scanner). At start the receiver removes half-written temporary files (never
acknowledged) and reconciles the spool with the job store: series it does not know are registered,
and series whose files are newer than their last recorded instance are re-opened (a crash between
the fsync and the database write). The watcher queues a series once it has been quiet for long
enough, judging from a few header tags of each instance whether it looks complete
(``ctp_node.node.shared.completeness``): a short wait for a complete-looking series, a long one for an
incomplete-looking one (then queued with a warning), the quiet period otherwise. A queued series is
announced to the webhooks (``series.received``, ``ctp_node.node.shared.notify``) without waiting on them.

Instances arrive by C-STORE (``scp``) and, when the web app includes ``ctp_node.web.stow``, by
STOW-RS; both go through ``ctp_node.node.receive.ingest.accept_instance`` into ``on_stored``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ctp_node.config import Settings
from ctp_node.node.receive.ingest import ReceivedInstance
from ctp_node.node.receive.scp import start_scp
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.completeness import CompletionPolicy, read_facts
from ctp_node.node.shared.health import JOB_STORE, OBJECT_STORE, ResourceHealth, one_line
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.notify import Notifier
from ctp_node.node.shared.object_store import StoreUnavailable
from ctp_node.node.shared.prometheus import NodeMetrics
from ctp_node.node.shared.storage import AnySpool, open_object_store, open_spool

log = logging.getLogger(__name__)


def recover_spool(spool: AnySpool, store: JobStore) -> int:
    """Reconcile the spool (a folder or an object store) with the job store; returns how many series
    were registered or re-opened."""
    removed = spool.remove_partial_files()
    if removed:
        log.info("removed %d partial files left by an interrupted write", removed)
    changed = 0
    for key in spool.iter_series():
        stored = spool.objects(key)  # (SOP Instance UID, when it was written)
        if not stored:
            continue
        newest = max(at for _, at in stored)
        job = store.find(key.series_uid)
        if job is None:
            facts = spool.facts(key, [uid for uid, _ in stored])
            store.record_instance(key.study_uid, key.series_uid, "", at=newest, count=len(stored), instances=facts)
            log.warning(
                "registered spooled series %s (%d instances) missing from the job store", key.series_uid, len(stored)
            )
        elif newest > job.last_received_at:
            if not store.instance_rows(job.id):  # counted by an older version: its instances first
                store.add_missing_instances(key.series_uid, spool.facts(key, [uid for uid, _ in stored]))
            late = [uid for uid, at in stored if at > job.last_received_at]
            facts = spool.facts(key, late)
            store.record_instance(
                key.study_uid, key.series_uid, job.calling_ae, at=newest, count=len(late), instances=facts
            )
            log.warning(
                "series %s: %d spooled instances newer than the job store knew; re-opened", key.series_uid, len(late)
            )
        else:
            if job.state.value == "receiving" and not store.instance_rows(job.id):
                # Received by an older version, which kept no per-instance facts: the completeness
                # check needs them (once; the state is not touched).
                store.add_missing_instances(key.series_uid, spool.facts(key, [uid for uid, _ in stored]))
            continue
        changed += 1
    return changed


class InstanceRecorder:
    """Writes received instances to the job store and the audit trail, in batches, off the C-STORE thread."""

    def __init__(
        self,
        store: JobStore,
        audit: AuditLog,
        metrics: NodeMetrics,
        batch: int = 256,
        linger_s: float = 0.05,
        health: ResourceHealth | None = None,
    ) -> None:
        # The files are already durable in the spool (and the spool is reconciled at start), so the
        # rows may lag by ``linger_s``: one transaction per batch instead of one commit (and one
        # fsync of the database) per instance, which halved the time a study takes to arrive.
        self.store, self.audit, self.metrics, self.batch, self.linger_s = store, audit, metrics, batch, linger_s
        self.health = health  # told when the job store fails and answers again (back-pressure)
        self._facts_checked: set[str] = set()  # series whose earlier instances the store knows by UID
        self._queue: queue.Queue[ReceivedInstance | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="instance-recorder")
        self._thread.start()

    def submit(self, instance: ReceivedInstance) -> None:
        self._queue.put(instance)

    def flush(self) -> None:
        """Block until everything submitted so far is recorded."""
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            deadline = time.monotonic() + self.linger_s
            while len(items) < self.batch and items[-1] is not None:
                try:
                    items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            received = [i for i in items if i is not None]
            if received:
                self._record(received)
            for _ in items:
                self._queue.task_done()
            if None in items:
                return

    def _backfill_once(self, series_uid: str, item: ReceivedInstance) -> None:
        """A series counted by an older version (no rows per instance) gets its spooled instances'
        rows before a new one is added, so that its count stays the number of distinct instances."""
        if series_uid in self._facts_checked:
            return
        job = self.store.find(series_uid)
        if job is not None and job.instances and not self.store.instance_rows(job.id) and isinstance(item.path, Path):
            folder = item.path.parent  # only a local spool predates per-instance rows
            files = sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
            self.store.add_missing_instances(series_uid, [read_facts(p, p.stem) for p in files])
        self._facts_checked.add(series_uid)

    def _record(self, received: list[ReceivedInstance]) -> None:
        by_series: dict[tuple[str, str, str], list[ReceivedInstance]] = {}
        for item in received:
            by_series.setdefault((item.key.study_uid, item.key.series_uid, item.calling_ae), []).append(item)
        for (study, series, calling_ae), items in by_series.items():
            # The SCP read the header facts with the identity; a file is read only without them.
            facts = [i.facts or read_facts(Path(i.path), i.sop_uid) for i in items]
            delay = 1.0
            while True:
                try:
                    self._backfill_once(series, items[0])
                    at = max(i.received_at for i in items)
                    self.store.record_instance(study, series, calling_ae, at=at, count=len(items), instances=facts)
                    if self.health is not None:
                        self.health.up(JOB_STORE)
                    break
                except Exception as exc:  # the files are safe in the spool: keep trying, never drop
                    if self.health is not None:  # and refuse new instances until the store answers
                        self.health.down(JOB_STORE, one_line(exc))
                    log.error("job store unavailable (%s); retrying in %.0f s", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 60.0)
        for item in received:
            self.metrics.count_received(item.calling_ae)  # a bounded label set
        self.audit.write_many(
            "received",
            [
                {
                    "time": item.received_at.isoformat(timespec="milliseconds"),
                    "study_uid": item.key.study_uid,
                    "series_uid": item.key.series_uid,
                    "sop_instance_uid": item.sop_uid,
                    "calling_ae": item.calling_ae,
                    "host": item.calling_host,
                }
                for item in received
            ],
        )


class Receiver:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        metrics: NodeMetrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # A wrong bucket or refused credentials stop the node here (ConfigError naming the key); a store
        # that does not answer yet does not: the receiver starts and refuses until it is back.
        self.object_store = open_object_store(settings.storage)
        self.spool = open_spool(settings.storage, self.object_store)
        self.audit = AuditLog(settings.storage.audit_log, store)
        self.metrics = metrics or NodeMetrics(store.read)
        self.health = self._health(settings, store)
        # Built here (not in start) so that a webhook secret that cannot be read stops the node at once.
        self.notifier = notifier or Notifier(settings.notify, settings.dicom.ae_title, self.metrics.registry)
        self.recorder: InstanceRecorder | None = None
        self._server = None

    def _health(self, settings: Settings, store: JobStore) -> ResourceHealth:
        """The resources whose trouble makes the receiver refuse: its disk, the job store, the object store."""
        probes: dict[str, Callable[[], None]] = {JOB_STORE: store.read.counts}
        if self.object_store is not None:
            probes[OBJECT_STORE] = self.object_store.probe
        return ResourceHealth(
            disk_paths=[self.spool.root],
            min_free_bytes=settings.storage.min_free_mb << 20,
            probes=probes,
            check_interval_s=settings.storage.check_interval_s,
            on_change=self.metrics.resource_changed,
        )

    def on_stored(self, instance: ReceivedInstance) -> None:
        """Hand a durably spooled instance to the job store's writer (C-STORE and STOW-RS alike)."""
        if self.recorder is None:
            raise RuntimeError("the receiver is not started: call start() first")
        self.recorder.submit(instance)

    def on_refused(self, reason: str) -> None:
        """Count a refused instance (C-STORE and STOW-RS alike) in ctp_node_refused_instances."""
        self.metrics.refused.labels(reason).inc()

    def start(self) -> None:
        self.health.check()  # the state at start: a store down now is refused from the first instance
        try:
            recover_spool(self.spool, self.store)
        except StoreUnavailable as exc:  # the next start reconciles; refusing meanwhile keeps nothing unrecorded
            log.error("could not reconcile the object store's spool with the job store: %s", exc)
        self.recorder = InstanceRecorder(self.store, self.audit, self.metrics, health=self.health)
        self._server = start_scp(self.settings.dicom, self.spool, self.on_stored, self.metrics, self.health)
        self.health.start()

    def watch(self, stop: threading.Event) -> None:
        """Queue quiet series until ``stop`` is set."""
        policy = CompletionPolicy.of(self.settings.series)
        interval = min(max(policy.shortest_s / 4, 0.2), 5.0)
        while not stop.wait(interval):
            try:
                queued = self.store.queue_quiet_series(policy)
                for job_id in queued:
                    job = self.store.get(job_id)
                    if job is None:  # deleted by hand meanwhile
                        continue
                    if job.warning:
                        log.warning("series %s (%d instances) %s", job.series_uid, job.instances, job.warning)
                    else:
                        log.info("series %s complete (%d instances): queued", job.series_uid, job.instances)
                    self.notifier.series_received(job)
            except Exception:
                log.exception("completion watcher error; continuing")

    def stop(self) -> None:
        self.health.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
        self.notifier.close()
