"""What the worker does with each kind of processing failure (ctp_node.node.work.process_stage.FAULTS)."""

from __future__ import annotations

import errno
import logging
from datetime import timedelta

import pytest

from ctp_node.errors import ConfigError, IncompleteSeriesError, InvalidHeaderError, PerfusionError
from ctp_node.node.shared.jobs import State, utcnow
from ctp_node.node.shared.retry import backoff_s
from ctp_node.node.shared.spool import InvalidUIDError, check_uid
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import Worker
from ctp_node.series.derived import DerivedSeriesError
from ctp_node.series.grid import GridError
from model import PlanError
from tests.node.worker_helpers import FakeSender


def due_now(store):
    """Skip the backoff wait: make every waiting job and delivery due."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")
        conn.exec_driver_sql("UPDATE deliveries SET next_attempt_at = NULL")


def raising(error, attempts):
    def process(job, files, out_dir):
        attempts.append(job.attempts)
        raise error

    return process


def writing(job, files, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "0.dcm").write_bytes(b"result")
    return ProcessOutput(out_dir, 1)


def invalid_uid():
    try:
        check_uid("1.2.3/../etc", "SeriesInstanceUID")
    except InvalidUIDError as exc:
        return exc
    raise AssertionError("check_uid accepted a path")


INPUT_FAULTS = [
    pytest.param(DerivedSeriesError("x.dcm states RescaleSlope 0: its pixel values cannot be HU"), id="derived"),
    pytest.param(GridError("no intracranial region found"), id="grid"),
    pytest.param(invalid_uid(), id="uid"),
    pytest.param(PlanError("times_s contains NaN or infinite values"), id="model-plan"),
    pytest.param(PerfusionError("no contrast enhancement anywhere in the series"), id="perfusion"),
    pytest.param(IncompleteSeriesError("volume 3 lacks slice 7"), id="incomplete"),
    pytest.param(InvalidHeaderError("x.dcm states a 65535x65535 matrix, beyond max_matrix 1024"), id="header"),
]


@pytest.mark.parametrize("error", INPUT_FAULTS)
def test_an_input_fault_fails_once_with_the_reason_and_no_traceback(env, caplog, error):
    settings, store = env
    attempts = []
    worker = Worker(settings, store, raising(error, attempts), sender=FakeSender([]), worker_id="w1")
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        job = worker.run_once()
    ended = store.get(job.id)
    assert ended.state == State.FAILED and ended.next_attempt_at is None
    assert ended.error == f"{type(error).__name__}: {error}"
    due_now(store)
    assert worker.run_once() is None and attempts == [1], "an input fault is never retried"
    assert not any(r.exc_info for r in caplog.records), "an input fault is reported without a traceback"
    assert str(error) in caplog.text
    assert worker.metrics.failures.labels("input")._value.get() == 1


def test_a_configuration_fault_fails_without_retry_and_says_so(env):
    settings, store = env
    attempts = []
    error = ConfigError("model.checkpoint /models/net.pt does not exist")
    worker = Worker(settings, store, raising(error, attempts), sender=FakeSender([]), worker_id="w1")
    job = worker.run_once()
    due_now(store)
    assert worker.run_once() is None and attempts == [1]
    ended = store.get(job.id)
    assert ended.state == State.FAILED and ended.error.startswith("configuration: ConfigError")


def test_a_transient_fault_is_retried_with_backoff_then_succeeds(env, caplog):
    settings, store = env
    attempts = []

    def disk_full_once(job, files, out_dir):
        attempts.append(job.attempts)
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return writing(job, files, out_dir)

    worker = Worker(settings, store, disk_full_once, sender=FakeSender([0x0000]), worker_id="w1")
    with caplog.at_level(logging.WARNING, logger="ctp_node"):
        job = worker.run_once()
    waiting = store.get(job.id)
    assert waiting.state == State.QUEUED and "No space left" in waiting.error
    delay = (waiting.next_attempt_at - utcnow()).total_seconds()
    assert 0 < delay <= backoff_s(1, settings.send)
    assert worker.run_once() is None, "not due before the backoff"
    assert not any(r.exc_info for r in caplog.records), "a transient fault is a warning, not a traceback"
    due_now(store)
    worker.run_once()
    assert store.get(job.id).state == State.DONE and attempts == [1, 2]


def test_a_transient_fault_that_persists_fails_after_max_attempts(env):
    settings, store = env
    attempts = []
    error = ConnectionRefusedError("the model server refused the connection")
    worker = Worker(settings, store, raising(error, attempts), sender=FakeSender([]), worker_id="w1")
    job = worker.run_once()
    for _ in range(settings.jobs.max_attempts):
        due_now(store)
        worker.run_once()
    assert attempts == list(range(1, settings.jobs.max_attempts + 1))
    ended = store.get(job.id)
    assert ended.state == State.FAILED and "refused the connection" in ended.error
    assert worker.metrics.failures.labels("transient")._value.get() == 1


def test_an_unexpected_error_is_retried_with_its_traceback_then_fails(env, caplog):
    settings, store = env
    attempts = []
    error = RuntimeError("CUDA error: out of memory")
    worker = Worker(settings, store, raising(error, attempts), sender=FakeSender([]), worker_id="w1")
    with caplog.at_level(logging.ERROR, logger="ctp_node"):
        job = worker.run_once()
        assert store.get(job.id).next_attempt_at > utcnow() + timedelta(seconds=1)
        for _ in range(settings.jobs.max_attempts):
            due_now(store)
            worker.run_once()
    assert attempts == [1, 2, 3]
    assert store.get(job.id).state == State.FAILED and "out of memory" in store.get(job.id).error
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [error] * 3
    assert worker.metrics.failures.labels("unexpected")._value.get() == 1


def test_a_job_whose_uid_cannot_be_a_path_fails_before_the_processor_runs(tmp_path):
    from ctp_node.config import Settings, StorageSettings
    from ctp_node.node.shared.jobs import JobStore

    settings = Settings(storage=StorageSettings(data_dir=tmp_path))
    store = JobStore(settings.database_url)
    store.record_instance("1.2.3", "1.2.3/../../etc", "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    attempts = []
    worker = Worker(settings, store, raising(AssertionError("never called"), attempts), worker_id="w1")
    job = worker.run_once()
    ended = store.get(job.id)
    assert ended.state == State.FAILED and ended.error.startswith("InvalidUIDError: SeriesInstanceUID")
    assert attempts == [] and not (tmp_path / "results").exists()


# Issue 23 item 7, through the real pipeline: a bad header costs one attempt and no inpainting; an output
# writer that fails costs the outputs only (the synthetic series is still sent, the job says what failed).


class CountingEngine:
    """model.LinearInpainter, counting the studies it was asked to fill."""

    def __init__(self):
        from model.engine import LinearInpainter

        self.inner, self.calls = LinearInpainter(), 0

    def inpaint_study(self, *args, **kwargs):
        self.calls += 1
        return self.inner.inpaint_study(*args, **kwargs)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """A small phantom study with a bolus (41 s every 4 s, 64 x 64 x 2), written once."""
    from ctp_node.phantom import PhantomConfig, generate_phantom
    from ctp_node.phantom.dicom_study import write_study
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    study = generate_phantom(PhantomConfig(matrix=64, slices=2, duration_s=41, noise_hu=6.0, seed=3))
    return write_study(sample_study(study, parse_schedule("every:4")), tmp_path_factory.mktemp("src"), uid_seed="23-7")


def spooled_worker(tmp_path, files, edit=None, sender=None):
    """A worker with the real processor (linear engine, every perfusion output) and ``files`` spooled
    and queued as one series; ``edit(ds)`` changes each header first."""
    import pydicom

    from ctp_node.config import Destination, PerfusionOutputSettings, Settings, StorageSettings
    from ctp_node.node.shared.jobs import JobStore
    from ctp_node.node.shared.spool import SeriesKey, Spool
    from ctp_node.node.work.series_processor import make_processor
    from ctp_node.series.derived import DerivedRecipe
    from ctp_node.series.pipeline import SeriesPipeline

    settings = Settings(
        storage=StorageSettings(data_dir=tmp_path),
        destinations=(Destination(name="pacs", host="127.0.0.1", port=4242, ae_title="PACS"),),
    )
    store, spool = JobStore(settings.database_url), Spool(settings.storage.spool_dir)
    for path in files:
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(ds)
        key = SeriesKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        spool.write(key, str(ds.SOPInstanceUID), _bytes(ds))
        store.record_instance(key.study_uid, key.series_uid, "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    engine = CountingEngine()
    recipe = DerivedRecipe("test model", "1", "test.pt sha256:0", "linear", 1)
    pipeline = SeriesPipeline(engine, recipe, perfusion_outputs=PerfusionOutputSettings(qa_report=False))
    worker = Worker(settings, store, make_processor(pipeline), sender=sender or FakeSender([]), worker_id="w1")
    return worker, store, engine


def _bytes(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_date_the_outputs_cannot_state_fails_the_job_at_once_without_inpainting(tmp_path, phantom_files, caplog):
    def bad_date(ds):
        ds.StudyDate = "<b>x</b>"

    worker, store, engine = spooled_worker(tmp_path, phantom_files, bad_date)
    with caplog.at_level(logging.INFO, logger="ctp_node"):
        job = worker.run_once()
    ended = store.get(job.id)
    assert ended.state == State.FAILED and ended.next_attempt_at is None, "an input fault: never retried"
    assert ended.error.startswith("InvalidHeaderError:") and "StudyDate '<b>x</b>'" in ended.error
    assert engine.calls == 0, "refused at assembly, before the inpainting"
    assert not any(r.exc_info for r in caplog.records)


def test_a_failing_output_writer_still_sends_the_synthetic_series_and_the_job_says_so(
    tmp_path, phantom_files, monkeypatch
):
    import ctp_node.series.outputs.writer as writer

    def broken(*args, **kwargs):
        raise ValueError("the colour writer broke")

    monkeypatch.setattr(writer, "write_colour_series", broken)
    sender = FakeSender([0x0000])
    worker, store, engine = spooled_worker(tmp_path, phantom_files, sender=sender)
    job = worker.run_once()
    done = store.get(job.id)
    assert done.state == State.DONE and engine.calls == 1
    assert sender.sent == [("PACS", 41 * 2)]  # the synthetic series (41 s, 2 slices), no half-written outputs
    assert "perfusion outputs not made: ValueError: the colour writer broke" in done.warning
