"""What the worker does with each kind of processing failure (ctp_node.node.worker.FAULTS)."""

from __future__ import annotations

import errno
import logging
from datetime import timedelta

import pytest

from ctp_node.errors import ConfigError, IncompleteSeriesError
from ctp_node.node.jobs import State, utcnow
from ctp_node.node.send import backoff_s
from ctp_node.node.spool import InvalidUIDError, check_uid
from ctp_node.node.worker import ProcessOutput, Worker
from ctp_node.perfusion import PerfusionError
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
    from ctp_node.node.jobs import JobStore

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
