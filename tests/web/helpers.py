"""A node's data folder with jobs in several states (shared by the status-page tests)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from ctp_node.config import Settings
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.spool import SeriesKey, Spool
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.scu import SendResult
from ctp_node.node.work.worker import Worker
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


def _qa_figure(path: Path, size: tuple[int, int] = (200, 120)) -> None:
    """A PNG like a QA figure: a gradient with a bright square (not blank, so a screenshot shows it)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 80)], axis=-1).astype(np.uint8)
    image[height // 4 : height * 3 // 4, width * 7 // 20 : width * 13 // 20] = 255
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
    states = {j.series_uid: j.state for j in store.read.jobs()}
    assert states == {DONE_SERIES: State.DONE, FAILED_SERIES: State.FAILED, RECEIVING_SERIES: State.RECEIVING}
    return settings, store


def job_id(store: JobStore, series_uid: str) -> int:
    return store.find(series_uid).id


# --- issue 25: a node as an operator meets it (retries, every output series, a job under way) ---------
RETRIED_SERIES, PROCESSING_SERIES, QUEUED_SERIES = (f"{STUDY}.{i}" for i in (4, 5, 6))
OUTPUT_SERIES = {  # folder under perfusion/ -> (SeriesDescription, instances), like the node's outputs
    "cbf_synthetic": ("CBF (synthetic 1 s) - RESEARCH USE ONLY", 4),
    "tmax_synthetic": ("Tmax (synthetic 1 s) - RESEARCH USE ONLY", 4),
    "sr_synthetic": ("Perfusion volumes SR - RESEARCH USE ONLY", 1),
    "seg_synthetic": ("Core and hypoperfusion SEG - RESEARCH USE ONLY", 1),
    "qa_report": ("CTP QA report", 1),
}
NOT_MEASURED = "not measured: fewer than 500 voxel-seconds"


def _all_outputs(job, files, out_dir: Path) -> ProcessOutput:
    """``_results`` and the perfusion outputs (each its own series in its own folder), a guardrail check
    that could not be measured, a motion record where nothing moved, and a large QA report."""
    _results(job, files, out_dir)
    for n, (folder, (description, count)) in enumerate(OUTPUT_SERIES.items(), 1):
        for i in range(count):
            path = out_dir / "perfusion" / folder / f"{folder.upper()}_{i:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds = ct_instance(path, study=job.study_uid, series=f"{job.series_uid}.{2000 + n}")
            ds.SeriesDescription, ds.SeriesNumber = description, 2000 + n
            ds.save_as(path, enforce_file_format=True)
    verdict = json.loads((out_dir / "guardrail.json").read_text())
    verdict["checks"].append(
        {"name": "csf offset", "value": None, "tolerance": 1.0, "passed": True, "voxels": 12, "detail": NOT_MEASURED}
    )
    (out_dir / "guardrail.json").write_text(json.dumps(verdict))
    still = [{"volume": v, "time_s": 4.0 * v, "displacement_mm": 0.1, "corrected": False, "residual_mm": 0.1,
              "reasons": []} for v in range(4)]  # fmt: skip
    (out_dir / "motion.json").write_text(json.dumps({"corrected": 0, "unusable": [], "volumes": still}))
    _qa_figure(out_dir / "qa_report.png", size=(1800, 1100))
    files_out = sum(1 for _ in out_dir.rglob("*.dcm"))
    return ProcessOutput(out_dir, files_out, GUARDRAIL)


def _due_now(store: JobStore) -> None:
    """Every waiting retry due now (a test does not wait out the backoff)."""
    from sqlalchemy import update

    from ctp_node.node.shared.job_tables import deliveries_table, series_table

    past = utcnow() - timedelta(seconds=1)
    with store.engine.begin() as conn:
        for table in (series_table, deliveries_table):
            conn.execute(update(table).where(table.c.next_attempt_at.is_not(None)).values(next_attempt_at=past))


def make_retried_node(data_dir: Path, **web: object) -> tuple[Settings, JobStore]:
    """``make_node``'s jobs 1 to 3, then job 4: done after two failed processing attempts (a full disk)
    and two refused deliveries, with every output series; job 5 processing (42 % done), job 6 queued."""
    settings, store = make_node(data_dir, **web)
    spool, audit = Spool(settings.storage.spool_dir), AuditLog(settings.storage.audit_log)
    for minutes, series in ((8, RETRIED_SERIES), (7, PROCESSING_SERIES), (6, QUEUED_SERIES)):
        _spool_series(spool, store, audit, series, minutes_ago=minutes)
    store.queue_quiet_series(60)
    calls = {"process": 0, "send": 0}

    def process(job, files, out_dir):
        calls["process"] += 1
        if calls["process"] < 3:
            raise OSError(28, "No space left on device")
        return _all_outputs(job, files, out_dir)

    def send(files, destination, aet):
        calls["send"] += 1
        if calls["send"] < 3:
            raise ConnectionRefusedError(111, f"Connection refused ({calls['send']})")
        return [SendResult(f, 0x0000) for f in files]

    worker = Worker(settings, store, process, sender=send, worker_id="test-worker")
    retried = store.find(RETRIED_SERIES).id
    for _ in range(8):
        worker.run_once()
        _due_now(store)
        if store.get(retried).state == State.DONE:
            break
    assert store.get(retried).state == State.DONE and calls == {"process": 3, "send": 3}
    claimed = store.claim("gpu-worker:1", 300)
    assert claimed is not None and claimed.series_uid == PROCESSING_SERIES
    store.record_progress(claimed.id, "gpu-worker:1", claimed.generation, 42, 100, 150.0)
    return settings, store
