"""Webhooks (ctp_node/node/shared/notify.py) against a local HTTP receiver the tests start on loopback."""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ctp_node.config import (
    Credential,
    DicomSettings,
    NotifySettings,
    SeriesSettings,
    Settings,
    StorageSettings,
    Webhook,
)
from ctp_node.errors import ConfigError
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.notify import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Notifier,
    verify_signature,
)
from tests.ports import free_port

SECRET = "webhook-secret-for-tests"
SECRET_ENV = "CTP_NODE_TEST_WEBHOOK_SECRET"


class Hook:
    """A webhook receiver: records each request; answers with the queued statuses, then 200."""

    def __init__(self) -> None:
        self.requests: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        self.statuses: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.hold.wait()
                hook.requests.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?key=in-the-url"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout_s: float = 20) -> tuple[dict[str, str], bytes]:
        return self.requests.get(timeout=timeout_s)

    def stop(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hook():
    hook = Hook()
    yield hook
    hook.stop()


@pytest.fixture()
def secret_env(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture()
def job(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER", count=40)
    return store.find("1.2.3.4")


def notify_settings(url: str, **overrides) -> NotifySettings:
    webhook = {"name": "ris", "url": url, "secret": Credential(env=SECRET_ENV)}
    webhook.update(overrides.pop("webhook", {}))
    values = {"webhooks": (Webhook(**webhook),), "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "timeout_s": 5}
    return NotifySettings(**{**values, **overrides})


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"webhook": "ris", **labels}) or 0.0


def test_a_notification_is_signed_json_without_patient_data(hook, secret_env, job):
    registry = CollectorRegistry()
    notifier = Notifier(notify_settings(hook.url), node="CTPNODE", registry=registry)
    try:
        notifier.series_received(job)
        headers, body = hook.next()
    finally:
        notifier.close()
    assert headers["content-type"] == "application/json" and headers[EVENT_HEADER.lower()] == "series.received"
    assert verify_signature(SECRET, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(
        "another secret", body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
    )
    assert not verify_signature(
        SECRET, body + b" ", headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
    )
    stale = str(int(headers[TIMESTAMP_HEADER.lower()]) - 3600)  # a replay an hour later
    assert not verify_signature(SECRET, body, stale, headers[SIGNATURE_HEADER.lower()])
    payload = json.loads(body)
    assert payload["event"] == "series.received" and payload["node"] == "CTPNODE"
    assert payload["id"] == headers[DELIVERY_HEADER.lower()]
    assert payload["job"]["id"] == job.id and payload["job"]["series_uid"] == "1.2.3.4"
    assert payload["job"]["state"] == "receiving" and payload["job"]["instances"] == 40
    assert not {"patient_name", "patient_id", "PatientName", "PatientID"} & (set(payload) | set(payload["job"]))
    assert counted(registry, "ctp_node_webhook_notifications_total", event="series.received", outcome="delivered") == 1


def test_delivered_and_failed_carry_their_facts(hook, secret_env, job):
    notifier = Notifier(notify_settings(hook.url))
    try:
        notifier.result_delivered(job, "pacs", instances=120)
        delivered = json.loads(hook.next()[1])
        notifier.failed(job, "IncompleteSeriesError: 3 slices missing")
        failed = json.loads(hook.next()[1])
    finally:
        notifier.close()
    assert delivered["event"] == "result.delivered" and delivered["destination"] == "pacs"
    assert delivered["instances_sent"] == 120
    assert failed["event"] == "job.failed" and failed["reason"] == "IncompleteSeriesError: 3 slices missing"
    assert "destination" not in failed


def test_server_errors_are_retried_with_the_same_id(hook, secret_env, job):
    registry = CollectorRegistry()
    hook.statuses = [503, 500]
    notifier = Notifier(notify_settings(hook.url), registry=registry)
    try:
        notifier.failed(job, "boom")
        attempts = [hook.next() for _ in range(3)]
        assert notifier.flush()
    finally:
        notifier.close()
    assert len({h[DELIVERY_HEADER.lower()] for h, _ in attempts}) == 1
    assert all(body == attempts[0][1] for _, body in attempts)
    assert counted(registry, "ctp_node_webhook_attempt_failures_total", event="job.failed") == 2
    assert counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="delivered") == 1


def test_backoff_doubles_up_to_its_cap(secret_env):
    notifier = Notifier(NotifySettings(initial_backoff_s=2, max_backoff_s=20))
    assert [notifier._backoff_s(attempt) for attempt in range(1, 6)] == [2, 4, 8, 16, 20]


def test_a_refusal_is_not_retried(hook, secret_env, job, caplog):
    registry = CollectorRegistry()
    hook.statuses = [403]
    notifier = Notifier(notify_settings(hook.url), registry=registry)
    with caplog.at_level(logging.WARNING, logger="ctp_node.node.shared.notify"):
        try:
            notifier.failed(job, "boom")
            hook.next()
            assert notifier.flush()
        finally:
            notifier.close()
    assert hook.requests.empty()
    assert counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="failed") == 1
    assert "HTTP 403" in caplog.text and "check its URL and secret" in caplog.text


def test_an_unreachable_receiver_is_retried_then_given_up_without_logging_secrets(secret_env, job, caplog):
    registry = CollectorRegistry()
    url = f"http://127.0.0.1:{free_port()}/hook?token=in-the-url"  # nothing listens there
    notifier = Notifier(notify_settings(url, max_attempts=3), registry=registry)
    with caplog.at_level(logging.DEBUG, logger="ctp_node.node.shared.notify"):
        try:
            notifier.failed(job, "boom")
            assert notifier.flush()
        finally:
            notifier.close()
    assert counted(registry, "ctp_node_webhook_attempt_failures_total", event="job.failed") == 3
    assert counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="failed") == 1
    assert "given up after 3 attempts" in caplog.text
    assert SECRET not in caplog.text and "in-the-url" not in caplog.text


def test_notifying_never_waits_on_the_receiver(hook, secret_env, job):
    hook.hold.clear()  # the receiver takes the request and does not answer
    notifier = Notifier(notify_settings(hook.url))
    caller = threading.Thread(target=lambda: [notifier.series_received(job) for _ in range(5)])
    caller.start()
    caller.join(timeout=10)
    try:
        assert not caller.is_alive()
    finally:
        hook.hold.set()
        notifier.close()


def test_only_subscribed_events_are_sent(hook, secret_env, job):
    notifier = Notifier(notify_settings(hook.url, webhook={"events": ("job.failed",)}))
    try:
        notifier.series_received(job)
        notifier.result_delivered(job, "pacs")
        notifier.failed(job, "boom")
        headers, _ = hook.next()
        assert notifier.flush()
    finally:
        notifier.close()
    assert headers[EVENT_HEADER.lower()] == "job.failed" and hook.requests.empty()


def test_a_full_queue_drops_the_oldest_and_stopping_drops_what_waits(secret_env, job):
    registry = CollectorRegistry()
    url = f"http://127.0.0.1:{free_port()}/hook"
    settings = notify_settings(url, max_pending=2, initial_backoff_s=60, max_backoff_s=60)
    notifier = Notifier(settings, registry=registry)
    for _ in range(4):
        notifier.failed(job, "boom")
    notifier.close(timeout_s=5)
    dropped = counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="dropped")
    failed_once = counted(registry, "ctp_node_webhook_attempt_failures_total", event="job.failed")
    assert dropped == 4 and failed_once >= 1  # 2 pushed out of the full queue, 2 waiting for a retry at stop
    notifier.failed(job, "after stop")  # counted, not sent, no error
    assert counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="dropped") == 5


def test_secrets_come_from_the_environment_or_a_file(tmp_path, monkeypatch, hook, job):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match=SECRET_ENV):
        Notifier(notify_settings(hook.url))
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        Notifier(notify_settings(hook.url, webhook={"secret": Credential(file=tmp_path / "missing")}))
    with pytest.raises(ValueError, match="exactly one of env"):
        Credential(env=SECRET_ENV, file=tmp_path / "x")
    (tmp_path / "secret").write_text(SECRET + "\n")
    notifier = Notifier(notify_settings(hook.url, webhook={"secret": Credential(file=tmp_path / "secret")}))
    try:
        notifier.failed(job, "boom")
        headers, body = hook.next()
    finally:
        notifier.close()
    assert verify_signature(SECRET, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()])


def test_the_receiver_announces_a_queued_series(tmp_path: Path, hook, secret_env):
    settings = Settings(
        storage=StorageSettings(data_dir=tmp_path / "data"),
        dicom=DicomSettings(bind_address="127.0.0.1", port=free_port()),
        series=SeriesSettings(quiet_period_s=0.2, complete_quiet_period_s=0.2, incomplete_wait_s=0.2),
        notify=notify_settings(hook.url),
    )
    store = JobStore(settings.database_url)
    receiver = Receiver(settings, store)
    store.record_instance("1.2.3", "1.2.3.9", "SCANNER", count=12)
    stop = threading.Event()
    watcher = threading.Thread(target=receiver.watch, args=(stop,))
    watcher.start()
    try:
        headers, body = hook.next()
    finally:
        stop.set()
        watcher.join()
        receiver.stop()
    payload = json.loads(body)
    assert headers[EVENT_HEADER.lower()] == "series.received"
    assert payload["job"]["series_uid"] == "1.2.3.9" and payload["job"]["state"] == "queued"
    assert payload["job"]["instances"] == 12
    assert (
        receiver.metrics.registry.get_sample_value(
            "ctp_node_webhook_notifications_total",
            {"webhook": "ris", "event": "series.received", "outcome": "delivered"},
        )
        == 1
    )


def _worker_with_hook(tmp_path: Path, url: str, processor, outcomes, events=None, destinations=1):
    from ctp_node.config import Destination
    from ctp_node.node.work.worker import Worker
    from tests.node.worker_helpers import FakeSender, queued_series

    settings, store = queued_series(tmp_path / "data")
    events = events or ("result.delivered", "job.delivered", "job.failed", "job.ignored")
    more = tuple(
        Destination(name=f"archive{i}", host="127.0.0.1", port=4243 + i, ae_title=f"ARCHIVE{i}")
        for i in range(1, destinations)
    )
    settings = settings.model_copy(
        update={
            "notify": notify_settings(url, webhook={"events": events}),
            "destinations": settings.destinations + more,
        }
    )
    return Worker(settings, store, processor, sender=FakeSender(outcomes)), store


def _writing(job, files, out_dir):
    from ctp_node.node.work.process_stage import ProcessOutput

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "1.dcm").write_bytes(b"x")
    return ProcessOutput(out_dir, 1)


def test_the_worker_announces_a_delivered_result(tmp_path: Path, hook, secret_env):
    worker, store = _worker_with_hook(tmp_path, hook.url, _writing, [0x0000])
    try:
        job = worker.run_once()
        headers, body = hook.next()
    finally:
        worker.close()
    payload = json.loads(body)
    assert headers[EVENT_HEADER.lower()] == "result.delivered"
    assert payload["destination"] == "pacs" and payload["instances_sent"] == 1
    # The only destination has its result: the job is done, and the event says so (not "sending").
    assert payload["job"]["id"] == job.id and payload["job"]["state"] == "done"
    headers, body = hook.next()
    assert headers[EVENT_HEADER.lower()] == "job.delivered"
    assert json.loads(body)["destinations"] == ["pacs"] and json.loads(body)["job"]["state"] == "done"


def test_job_delivered_comes_once_every_destination_has_the_result(tmp_path: Path, hook, secret_env):
    from datetime import timedelta

    from ctp_node.node.shared.jobs import utcnow

    # pacs stores the result at once; archive1 is busy (0xA700, retried later), then stores it
    worker, store = _worker_with_hook(tmp_path, hook.url, _writing, [0x0000, 0xA700, 0x0000], destinations=2)
    try:
        job = worker.run_once()
        headers, body = hook.next()
        first = json.loads(body)
        assert headers[EVENT_HEADER.lower()] == "result.delivered" and first["destination"] == "pacs"
        assert first["job"]["state"] == "sending"  # archive1 still to go: no job.delivered yet
        archive = next(d for d in store.deliveries(job.id) if d.destination == "archive1")
        store.delivery_failed(archive.id, "busy", utcnow() - timedelta(seconds=1))  # due now
        again = store.claim(worker.sending.worker_id, 60, now=utcnow() + timedelta(minutes=5), sending_only=True)
        assert again is not None and again.id == job.id
        worker.sending.deliver(again)
        events = [hook.next() for _ in range(2)]
    finally:
        worker.close()
    assert hook.requests.empty()
    (delivered_headers, delivered), (done_headers, done) = ((h, json.loads(b)) for h, b in events)
    assert delivered_headers[EVENT_HEADER.lower()] == "result.delivered" and delivered["destination"] == "archive1"
    assert delivered["job"]["state"] == "done"  # the last destination: the job is done
    assert done_headers[EVENT_HEADER.lower()] == "job.delivered"
    assert done["destinations"] == ["archive1", "pacs"] and done["job"]["state"] == "done"


def test_the_worker_announces_an_input_fault_and_a_given_up_delivery(tmp_path: Path, hook, secret_env):
    from ctp_node.errors import NotCTPError

    def not_ct(job, files, out_dir):
        raise NotCTPError("MR, not CT")

    worker, store = _worker_with_hook(tmp_path, hook.url, not_ct, [])
    try:
        worker.run_once()
        headers, body = hook.next()
    finally:
        worker.close()
    payload = json.loads(body)
    # Not a perfusion series: its own event, never job.failed
    assert headers[EVENT_HEADER.lower()] == "job.ignored" and "MR, not CT" in payload["reason"]
    assert payload["job"]["state"] == "ignored"

    settings_dir = tmp_path / "second"
    worker, store = _worker_with_hook(settings_dir, hook.url, _writing, [0xA700])
    worker.settings = worker.settings.model_copy(
        update={"send": worker.settings.send.model_copy(update={"max_attempts": 1})}
    )
    worker.sending.settings = worker.settings
    try:
        worker.run_once()
        headers, body = hook.next()
    finally:
        worker.close()
    payload = json.loads(body)
    assert headers[EVENT_HEADER.lower()] == "job.failed"
    assert payload["destination"] == "pacs" and "given up" in payload["reason"]
    assert payload["job"]["state"] == "failed"  # as the sending pass left it


def test_an_ignored_series_is_not_announced_by_default(tmp_path: Path, hook, secret_env):
    """With the default events a RIS hears nothing about an ordinary head CT that was routed to the node."""
    from ctp_node.config import Webhook
    from ctp_node.errors import NotCTPError

    def not_ct(job, files, out_dir):
        raise NotCTPError("a plain head CT: one volume")

    default_events = Webhook.model_fields["events"].default
    assert "job.ignored" not in default_events and "job.delivered" in default_events
    worker, store = _worker_with_hook(tmp_path, hook.url, not_ct, [], events=default_events)
    try:
        job = worker.run_once()
        assert worker.notifier.flush(10)
    finally:
        worker.close()
    assert store.get(job.id).state.value == "ignored"
    assert hook.requests.empty()


def test_the_configured_events_are_the_ones_the_notifier_sends():
    from typing import get_args

    from ctp_node.config import WebhookEvent
    from ctp_node.node.shared.notify import EVENTS

    assert set(get_args(WebhookEvent)) == set(EVENTS)


class TricklingHook:
    """A webhook receiver that takes the request, then answers one byte every ``interval_s`` (status
    line and headers included) for at most ``for_s`` seconds: every read gets a byte well within a
    per-read timeout, so only a whole-try deadline ends the try."""

    def __init__(self, interval_s: float = 0.5, for_s: float = 8.0) -> None:
        self.interval_s, self.for_s = interval_s, for_s
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 200 + b"\r\nContent-Length: 0\r\n\r\n"
        deadline = time.monotonic() + self.for_s
        try:
            conn.settimeout(1)
            conn.recv(65536)  # the request (small enough for one read on loopback)
            for i in range(len(answer)):
                if self.stopping.is_set() or time.monotonic() > deadline:
                    break
                conn.sendall(answer[i : i + 1])
                self.stopping.wait(self.interval_s)
        except OSError:
            pass  # the client hung up: what a whole-try deadline does
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture()
def trickling_hook():
    hook = TricklingHook()
    yield hook
    hook.stop()


def test_a_trickling_receiver_cannot_hold_a_try_past_the_timeout(trickling_hook, secret_env, job, caplog):
    registry = CollectorRegistry()
    settings = notify_settings(trickling_hook.url, timeout_s=1, max_attempts=1)
    notifier = Notifier(settings, registry=registry)
    try:
        with caplog.at_level(logging.WARNING, logger="ctp_node.node.shared.notify"):
            started = time.monotonic()
            notifier.failed(job, "boom")
            while time.monotonic() - started < 10:
                if counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="failed"):
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - started
    finally:
        notifier.close()
    assert counted(registry, "ctp_node_webhook_notifications_total", event="job.failed", outcome="failed") == 1
    assert elapsed < 2.0, f"the try lasted {elapsed:.1f} s with timeout_s = 1"
    assert "Timeout" in caplog.text


def test_a_slow_webhook_does_not_delay_the_others(trickling_hook, hook, secret_env, job):
    slow = Webhook(name="slow", url=trickling_hook.url, secret=Credential(env=SECRET_ENV))
    healthy = Webhook(name="ris", url=hook.url, secret=Credential(env=SECRET_ENV))
    settings = NotifySettings(webhooks=(slow, healthy), timeout_s=4, max_attempts=1)
    registry = CollectorRegistry()
    notifier = Notifier(settings, registry=registry)
    try:
        started = time.monotonic()
        notifier.failed(job, "boom")
        headers, _ = hook.next(timeout_s=10)
        elapsed = time.monotonic() - started
        slow_outcomes = [
            counted(registry, "ctp_node_webhook_notifications_total", webhook="slow", event="job.failed", outcome=o)
            for o in ("delivered", "failed")
        ]
    finally:
        notifier.close()
    assert headers[EVENT_HEADER.lower()] == "job.failed"
    assert elapsed < 1.5, f"the healthy webhook waited {elapsed:.1f} s behind the slow one"
    assert slow_outcomes == [0, 0]  # the slow one was still being tried
