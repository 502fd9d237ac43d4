import pytest

from ctp_node.config import SendSettings
from ctp_node.errors import IncompleteSeriesError, NotCTPError
from ctp_node.node.shared.jobs import State
from ctp_node.node.shared.retry import backoff_s
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import Worker
from tests.node.worker_helpers import FakeSender


def writing_processor(calls):
    def process(job, files, out_dir):
        calls.append((job.generation, len(files)))
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (out_dir / f"{i}.dcm").write_bytes(b"result")
        return ProcessOutput(out_dir, 2)

    return process


def test_backoff_grows_and_is_capped():
    policy = SendSettings(initial_backoff_s=30, backoff_multiplier=2, max_backoff_s=100)
    assert [backoff_s(a, policy) for a in (1, 2, 3, 4)] == [30, 60, 100, 100]


def test_happy_path_processes_sends_and_audits(env):
    settings, store = env
    calls, sender = [], FakeSender([0x0000])
    worker = Worker(settings, store, writing_processor(calls), sender=sender, worker_id="w1")
    job = worker.run_once()
    assert calls == [(1, 3)] and sender.sent == [("PACS", 2)]
    done = store.get(job.id)
    assert done.state == State.DONE and done.processing_s is not None
    events = worker.audit.read()
    assert events[-1]["event"] == "sent" and events[-1]["instances"] == 2
    assert worker.run_once() is None


def test_destination_down_then_back_is_delivered_once(env):
    settings, store = env
    sender = FakeSender([ConnectionError("no association with PACS"), 0x0000])
    worker = Worker(settings, store, writing_processor([]), sender=sender, worker_id="w1")
    job = worker.run_once()
    waiting = store.get(job.id)
    assert waiting.state == State.SENDING and "no association" in store.deliveries(job.id)[0].error
    assert worker.run_once() is None  # backoff: not due yet
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")
        conn.exec_driver_sql("UPDATE deliveries SET next_attempt_at = NULL")
    worker.run_once()
    assert store.get(job.id).state == State.DONE
    assert sender.sent == [("PACS", 2)]  # exactly one successful delivery


def test_refused_instances_retry_then_fail_with_reason(env):
    settings, store = env
    sender = FakeSender([0xA700, 0xA700, 0xA700])
    worker = Worker(settings, store, writing_processor([]), sender=sender, worker_id="w1")
    job = worker.run_once()
    for _ in range(2):
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE series SET next_attempt_at = NULL")
            conn.exec_driver_sql("UPDATE deliveries SET next_attempt_at = NULL")
        worker.run_once()
    failed = store.get(job.id)
    assert failed.state == State.FAILED and "2 of 2 instances refused (0xa700)" in failed.error


@pytest.mark.parametrize(
    ("error", "state", "text"),
    [
        (NotCTPError("one time point"), State.IGNORED, "not CTP"),
        (IncompleteSeriesError("volume 3 lacks slice 7"), State.FAILED, "IncompleteSeriesError"),
    ],
)
def test_input_errors_end_the_job_with_the_reason(env, error, state, text):
    settings, store = env

    def broken(job, files, out_dir):
        raise error

    worker = Worker(settings, store, broken, sender=FakeSender([]), worker_id="w1")
    job = worker.run_once()
    ended = store.get(job.id)
    assert ended.state == state and text in ended.error
