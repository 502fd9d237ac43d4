"""The receiving process: SCP into the spool, a row per series, and the completion watcher.

Never touches the GPU. At start it removes half-written temporary files (never acknowledged),
registers spooled series the job store does not know (a crash between the fsync and the database
write), and lets the watcher queue every series that has been quiet for the configured period.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from ctp_node.audit import AuditLog
from ctp_node.config import Settings
from ctp_node.jobs import JobStore
from ctp_node.metrics import NodeMetrics
from ctp_node.scp import ReceivedInstance, start_scp
from ctp_node.spool import Spool

log = logging.getLogger(__name__)


def recover_spool(spool: Spool, store: JobStore) -> int:
    """Register series whose files are in the spool but not in the job store; returns how many."""
    removed = spool.remove_partial_files()
    if removed:
        log.info("removed %d partial files left by an interrupted write", removed)
    registered = 0
    for key in spool.iter_series():
        if store.find(key.series_uid) is not None:
            continue
        files = spool.instances(key)
        if not files:
            continue
        newest = max(datetime.fromtimestamp(p.stat().st_mtime, tz=timezone.utc) for p in files)
        for _ in files:
            store.record_instance(key.study_uid, key.series_uid, "", at=newest)
        registered += 1
        log.warning(
            "registered spooled series %s (%d instances) missing from the job store", key.series_uid, len(files)
        )
    return registered


class Receiver:
    def __init__(self, settings: Settings, store: JobStore, metrics: NodeMetrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.spool = Spool(settings.storage.spool_dir)
        self.audit = AuditLog(settings.storage.audit_log)
        self.metrics = metrics or NodeMetrics(store)
        self._server = None

    def on_stored(self, instance: ReceivedInstance) -> None:
        self.store.record_instance(instance.key.study_uid, instance.key.series_uid, instance.calling_ae)
        self.metrics.received.labels(instance.calling_ae).inc()
        self.audit.write(
            "received",
            study_uid=instance.key.study_uid,
            series_uid=instance.key.series_uid,
            sop_instance_uid=instance.sop_uid,
            calling_ae=instance.calling_ae,
            host=instance.calling_host,
        )

    def start(self) -> None:
        recover_spool(self.spool, self.store)
        self._server = start_scp(self.settings.dicom, self.spool, self.on_stored)

    def watch(self, stop: threading.Event) -> None:
        """Queue quiet series until ``stop`` is set."""
        period = self.settings.series.quiet_period_s
        interval = min(max(period / 4, 0.2), 5.0)
        while not stop.wait(interval):
            try:
                for job_id in self.store.queue_quiet_series(period):
                    job = self.store.get(job_id)
                    log.info("series %s complete (%d instances): queued", job.series_uid, job.instances)
            except Exception:
                log.exception("completion watcher error; continuing")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
