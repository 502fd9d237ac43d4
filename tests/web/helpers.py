"""A node's data folder with jobs in several states (shared by the status-page tests)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from ctp_node.config import Settings
from ctp_node.node.audit import AuditLog
from ctp_node.node.jobs import JobStore, State, utcnow
from ctp_node.node.scu import SendResult
from ctp_node.node.spool import SeriesKey, Spool
from ctp_node.node.worker import ProcessOutput, Worker
from ctp_node.web.passwords import hash_password
from tests.node.dicom_helpers import ct_instance

TOKEN = "t0ken-for-the-status-page-tests"
USER, PASSWORD = "operator", "correct horse battery staple"
PATIENT_NAME, PATIENT_ID = "DOE^JOHN", "PAT123456"
STUDY = "1.2.826.0.1.3680043.8.498.1"
DONE_SERIES, FAILED_SERIES, RECEIVING_SERIES = (f"{STUDY}.{i}" for i in (1, 2, 3))
# A cheap scrypt cost: the tests check the scheme, not its strength.
PASSWORD_HASH = hash_password(PASSWORD, n=2**10)
GUARDRAIL = "pass: grey offset +0.10 HU (tolerance 1 HU)"


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(data_dir: Path, **web: object) -> Settings:
    """A node with the page on, its token and password hash in files beside the data folder."""
    secrets = data_dir.parent / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "web-token").write_text(TOKEN + "\n")
    (secrets / "web-password.hash").write_text(PASSWORD_HASH + "\n")
    credentials = {
        "token": {"file": str(secrets / "web-token")},
        "basic_user": USER,
        "basic_password_hash": {"file": str(secrets / "web-password.hash")},
    }
    return Settings(
        storage={"data_dir": str(data_dir)},
        destinations=({"name": "pacs", "host": "127.0.0.1", "port": 4242, "ae_title": "PACS"},),
        web={"enabled": True, **credentials, **web},
    )


def _qa_figure(path: Path) -> None:
    """A PNG like a QA figure: a gradient with a bright square (not blank, so a screenshot shows it)."""
    y, x = np.mgrid[0:120, 0:200]
    image = np.stack([x * 255 // 200, y * 255 // 120, np.full_like(x, 80)], axis=-1).astype(np.uint8)
    image[30:90, 70:130] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _results(job, files, out_dir: Path) -> ProcessOutput:
    """What the pipeline leaves in a results folder: the derived series, the guardrail's verdict, a QA figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    derived = f"{job.series_uid}.1000"
    for i in range(3):
        ds = ct_instance(out_dir / f"CTP1S_{i:04d}_000.dcm", study=job.study_uid, series=derived, value=i)
        ds.SeriesDescription = "1s SYNTHETIC - RESEARCH USE ONLY"
        ds.save_as(out_dir / f"CTP1S_{i:04d}_000.dcm", enforce_file_format=True)
    verdict = {
        "policy": "flag", "passed": True, "action": "none", "synthetic_seconds": 18, "noise_hu": 4.1,
        "summary": GUARDRAIL,
        "checks": [{"name": "grey", "value": 0.1, "tolerance": 1.0, "passed": True, "voxels": 5120, "detail": ""}],
    }  # fmt: skip
    (out_dir / "guardrail.json").write_text(json.dumps(verdict))
    _qa_figure(out_dir / "qa" / "curves.png")
    return ProcessOutput(out_dir, 3, GUARDRAIL)


def _spool_series(spool: Spool, store: JobStore, audit: AuditLog, series: str, *, minutes_ago: float) -> None:
    """Three received instances, recorded as the receiver records them (job store and audit trail)."""
    key = SeriesKey(STUDY, series)
    at = utcnow() - timedelta(minutes=minutes_ago)
    for i in range(3):
        path = spool.series_dir(key) / f"{series}.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = ct_instance(path, study=STUDY, series=series, sop=f"{series}.{i}")
        ds.PatientName, ds.PatientID, ds.StudyDate = PATIENT_NAME, PATIENT_ID, "20260101"
        ds.SeriesDescription, ds.SeriesNumber = "CTP 4D", 5
        ds.save_as(path, enforce_file_format=True)
        store.record_instance(STUDY, series, "SCANNER", at=at)
        audit.write(
            "received", time=at.isoformat(timespec="milliseconds"), study_uid=STUDY, series_uid=series,
            sop_instance_uid=f"{series}.{i}", calling_ae="SCANNER", host="127.0.0.1",
        )  # fmt: skip


class _Sent:
    def __call__(self, files, peer, aet):
        return [SendResult(f, 0x0000) for f in files]


def make_node(data_dir: Path, **web: object) -> tuple[Settings, JobStore]:
    """Jobs 1 (done, sent to pacs, with results), 2 (failed), 3 (receiving), made by the real worker."""
    settings = settings_for(data_dir, **web)
    store = JobStore(settings.database_url)
    spool, audit = Spool(settings.storage.spool_dir), AuditLog(settings.storage.audit_log)
    _spool_series(spool, store, audit, DONE_SERIES, minutes_ago=10)
    _spool_series(spool, store, audit, FAILED_SERIES, minutes_ago=9)
    store.queue_quiet_series(60)
    worker = Worker(settings, store, _results, sender=_Sent(), worker_id="test-worker")
    assert worker.run_once().series_uid == DONE_SERIES

    def broken(job, files, out_dir):
        from ctp_node.errors import CTPInputError

        raise CTPInputError("only 2 time points; at least 3 are needed")

    Worker(settings, store, broken, worker_id="test-worker").run_once()
    _spool_series(spool, store, audit, RECEIVING_SERIES, minutes_ago=0)
    states = {j.series_uid: j.state for j in store.list()}
    assert states == {DONE_SERIES: State.DONE, FAILED_SERIES: State.FAILED, RECEIVING_SERIES: State.RECEIVING}
    return settings, store


def job_id(store: JobStore, series_uid: str) -> int:
    return store.find(series_uid).id
