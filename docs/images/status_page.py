"""Make docs/images/status-page-jobs.png and status-page-job.png: the status page in headless Chromium.

A node's data folder is filled as the node fills it (the real job store, worker and send stage, with
stand-in processors and senders): a job done after two failed processing attempts and two refused
deliveries, one failed, one processing, one queued, one ignored and one still receiving. The done
job's results are those of ``--results`` (a folder as ``docs/images/demo_outputs.py --keep`` leaves:
``derived/``, ``perfusion/``, ``qa_report.png``), else stand-ins named and described like the node's
outputs (the 1 s series, quantitative and colour maps and an SR per analysis, the QA report) with
``--qa-figure`` as the QA report (default: docs/images/demo-outputs.png). Then the page is served
and photographed by Debian's chromium (``apt-get install chromium chromium-driver``).

    .venv/bin/python docs/images/status_page.py [--results /tmp/demo-outputs] [--suffix=-before]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from PIL import Image
from sqlalchemy import update

# The status-page tests' helpers make the spooled series and stand-in results (run from the repository root).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ctp_node.errors import CTPInputError, NotCTPError
from ctp_node.node.shared.job_tables import deliveries_table, series_table
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.scu import SendResult
from ctp_node.node.work.worker import Worker
from ctp_node.web import start_web
from tests.node.dicom_helpers import ct_instance
from tests.web.helpers import PASSWORD, STUDY, USER, _results, _spool_series, settings_for

HERE = Path(__file__).resolve().parent
SERIES = {name: f"{STUDY}.{i}" for i, name in enumerate(("done", "failed", "ignored", "processing", "queued"), 11)}
RECEIVING = f"{STUDY}.20"


def _due_now(store: JobStore) -> None:
    """Every waiting retry due now (the script does not wait out the backoff)."""
    past = utcnow() - timedelta(seconds=1)
    with store.engine.begin() as conn:
        conn.execute(
            update(series_table).where(series_table.c.next_attempt_at.is_not(None)).values(next_attempt_at=past)
        )
        conn.execute(
            update(deliveries_table).where(deliveries_table.c.next_attempt_at.is_not(None)).values(next_attempt_at=past)
        )


def stand_in_outputs(job, out_dir: Path, qa_figure: Path) -> None:
    """Output series named and described as the node writes them, a few small instances each."""
    n = 0
    for analysis, short in (("synthetic", "1 s"), ("acquired", "acquired")):
        for name, title, unit in (("cbf", "CBF", "mL/100g/min"), ("cbv", "CBV", "mL/100g"), ("mtt", "MTT", "s"),
                                  ("tmax", "Tmax", "s"), ("ttp", "TTP", "s")):  # fmt: skip
            for kind, text in (("map", f"{title} {unit} {short}"), ("colour", f"{title} colour {short}")):
                n += 1
                folder = out_dir / "perfusion" / f"{analysis}_{name}{'_colour' if kind == 'colour' else ''}"
                _series(job, folder, f"{name.upper()}_{kind.upper()}", f"{text} - RESEARCH USE ONLY", 1000 + n, 8)
        n += 1
        _series(job, out_dir / "perfusion" / f"{analysis}_sr", "SR", f"CTP volumes SR {short}", 1000 + n, 1)
    _series(job, out_dir / "perfusion" / "qa_report", "QA_REPORT", "CTP QA report", 1099, 1)
    shutil.copy(qa_figure, out_dir / "qa_report.png")


def _series(job, folder: Path, prefix: str, description: str, number: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{prefix}_{i:03d}.dcm"
        ds = ct_instance(path, study=job.study_uid, series=f"{job.series_uid}.{number}")
        ds.SeriesDescription, ds.SeriesNumber, ds.StudyDate, ds.StudyTime = description, number, "20260101", "101500"
        ds.save_as(path, enforce_file_format=True)


def populate(data_dir: Path, results: Path | None, qa_figure: Path) -> tuple:
    settings = settings_for(data_dir)
    settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"max_attempts": 3})})
    store = JobStore(settings.database_url)
    from ctp_node.node.shared.audit import AuditLog
    from ctp_node.node.shared.spool import Spool

    spool, audit = Spool(settings.storage.spool_dir), AuditLog(settings.storage.audit_log)
    for i, series in enumerate(SERIES.values()):
        _spool_series(spool, store, audit, series, minutes_ago=40 - 5 * i)
    store.queue_quiet_series(60)

    calls = {"process": 0, "send": 0}

    def process(job, files, out_dir: Path) -> ProcessOutput:
        if job.series_uid == SERIES["failed"]:
            raise CTPInputError("only 2 time points; at least 3 are needed")
        if job.series_uid == SERIES["ignored"]:
            raise NotCTPError("one time point: not a perfusion series")
        calls["process"] += 1
        if calls["process"] < 3:
            raise OSError(28, "No space left on device")
        if results is None:
            _results(job, files, out_dir)
            shutil.rmtree(out_dir / "qa", ignore_errors=True)  # the tests' small stand-in figure
            stand_in_outputs(job, out_dir, qa_figure)
            return ProcessOutput(
                out_dir, len(list(out_dir.rglob("*.dcm"))), "pass: grey offset +0.10 HU (tolerance 1 HU)"
            )
        shutil.copytree(results / "derived", out_dir, dirs_exist_ok=True)
        shutil.copytree(results / "perfusion", out_dir / "perfusion", dirs_exist_ok=True)
        shutil.copy(results / "qa_report.png", out_dir / "qa_report.png")
        files_out = sorted(out_dir.rglob("*.dcm"))
        return ProcessOutput(out_dir, len(files_out), "pass: grey offset +0.10 HU (tolerance 1 HU)")

    def send(files, destination, aet):
        calls["send"] += 1
        if calls["send"] < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return [SendResult(f, 0x0000) for f in files]

    worker = Worker(settings, store, process, sender=send, worker_id="ctp-worker-1:4242")
    finished = (State.DONE, State.FAILED, State.IGNORED)
    for _ in range(12):  # three processing attempts, three sending passes, the failed and ignored jobs
        if all(store.find(SERIES[k]).state in finished for k in ("done", "failed", "ignored")):
            break
        worker.run_once()
        _due_now(store)
    # One job being processed (claimed by a worker that is still at it), one waiting for a worker.
    processing = store.claim("ctp-worker-2:4343", 300)
    assert processing is not None and processing.series_uid == SERIES["processing"], processing
    if hasattr(store, "record_progress"):  # the job store of issue 25 on: progress and an ETA
        store.record_progress(processing.id, "ctp-worker-2:4343", processing.generation, 11, 26, 95.0)
    _spool_series(spool, store, audit, RECEIVING, minutes_ago=0)
    return settings, store


def screenshots(settings, store, suffix: str) -> list[Path]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="ctp-chromium-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--hide-scrollbars", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    server = start_web(settings, store, port=0)
    written = []
    try:
        base = f"http://{USER}:{quote(PASSWORD, safe='')}@{server.host}:{server.port}"
        done = store.find(SERIES["done"]).id
        for name, path, size in (("jobs", "/", (1400, 660)), ("job", f"/jobs/{done}", (1400, 2000))):
            driver.set_window_size(*size)
            driver.get(base + path)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            # The whole page (headless chromium's viewport is the window less about 140 px), at most 2600 px.
            driver.set_window_size(size[0], min(int(height) + 140, 2600))
            png = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
            target = HERE / f"status-page-{name}{suffix}.png"
            # 256 colours: the page is mostly flat, so the file stays a few hundred KB at most.
            png.quantize(256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
            written.append(target)
    finally:
        server.stop()
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None, help="a demo_outputs.py --keep folder")
    parser.add_argument("--qa-figure", type=Path, default=HERE / "demo-outputs.png", help="the stand-in QA report")
    parser.add_argument("--suffix", default="", help="added to the file names, e.g. -before")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctp-status-page-") as tmp:
        settings, store = populate(Path(tmp) / "data", args.results, args.qa_figure)
        for path in screenshots(settings, store, args.suffix):
            print(f"{path} ({path.stat().st_size // 1024} KiB)")
        store.engine.dispose()


if __name__ == "__main__":
    main()
