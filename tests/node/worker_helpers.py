"""A queued series and a scripted sender for the worker tests (tests/node/test_worker*.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from ctp_node.config import Destination, SendSettings, Settings, StorageSettings
from ctp_node.node.shared.jobs import JobStore, utcnow
from ctp_node.node.shared.spool import SeriesKey, Spool
from ctp_node.node.work.scu import SendResult

KEY = SeriesKey("1.2.3", "1.2.3.4")


def queued_series(data_dir: Path) -> tuple[Settings, JobStore]:
    """Settings with one destination and a job store holding KEY (3 spooled instances) queued."""
    settings = Settings(
        storage=StorageSettings(data_dir=data_dir),
        destinations=(Destination(name="pacs", host="127.0.0.1", port=4242, ae_title="PACS"),),
        send=SendSettings(max_attempts=3, initial_backoff_s=10, backoff_multiplier=2, max_backoff_s=15),
    )
    store = JobStore(settings.database_url)
    spool = Spool(settings.storage.spool_dir)
    for i in range(3):
        spool.write(KEY, f"1.2.3.4.{i}", b"x")
        store.record_instance(KEY.study_uid, KEY.series_uid, "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    return settings, store


class FakeSender:
    """Answers each send with the next of ``outcomes``: a DIMSE status for every file, or an exception."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.sent = []

    def __call__(self, files, peer, aet):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        self.sent.append((peer.ae_title, len(files)))
        return [SendResult(f, outcome) for f in files]
