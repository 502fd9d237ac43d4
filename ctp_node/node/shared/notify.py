"""Webhooks: the node tells other systems when a series has arrived, a result was delivered (to one
destination, then to all), a job failed or was ignored (not a perfusion series).

Each configured webhook (``[[notify.webhooks]]``: name, url, secret, events) gets a JSON POST per
event it subscribed to. The body holds the event, the job (id, study and series UIDs, state,
generation, instance count) and the event's own facts (destination, reason); never a patient's name
or ID (the job store holds none). Headers:

- ``X-CTP-Node-Event``: the event; ``X-CTP-Node-Delivery``: the notification's id (the same on every
  retry, so a receiver can drop repeats);
- ``X-CTP-Node-Timestamp``: Unix seconds when this attempt was signed;
- ``X-CTP-Node-Signature``: ``sha256=`` and the hex HMAC-SHA256, keyed with the webhook's secret, of
  ``<timestamp>.`` followed by the body bytes (:func:`verify_signature` checks one). Signing the
  timestamp lets a receiver refuse replays older than a few minutes.

Sending never blocks the caller: notifications go to a queue; each webhook has its own background
thread, so a slow receiver delays only its own notifications. ``timeout_s`` bounds a whole try
(connect, request, status line and headers; the response body is never read): past it the socket is
shut down, so a receiver that trickles its answer byte by byte cannot hold a try longer. Tries are
retried on connection errors, timeouts, 408, 425, 429 and 5xx with exponential backoff
(``initial_backoff_s`` doubling up to ``max_backoff_s``, at most ``max_attempts`` tries; a numeric
Retry-After is honoured within that cap). Other 4xx answers are not retried. Every failed attempt,
every notification given up and every one dropped (queue full, node stopping) is logged (webhook
name, event, job id: never the URL, which may carry a token, nor the secret) and counted in
``ctp_node_webhook_attempt_failures`` / ``ctp_node_webhook_notifications{outcome}``. Notifications
are best effort: pending retries do not survive a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests
from prometheus_client import CollectorRegistry, Counter
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection

from ctp_node.config import NotifySettings, Webhook
from ctp_node.node.shared.jobs import SeriesJob, State

log = logging.getLogger(__name__)

SERIES_RECEIVED = "series.received"
RESULT_DELIVERED = "result.delivered"  # at one destination
JOB_DELIVERED = "job.delivered"  # at every destination: the job is done
JOB_FAILED = "job.failed"
# Not a perfusion series (an ordinary head CT routed to the node): no failure, and not sent unless
# subscribed, since a PACS that routes every CT series would otherwise notify for each of them.
JOB_IGNORED = "job.ignored"
EVENTS = (SERIES_RECEIVED, RESULT_DELIVERED, JOB_DELIVERED, JOB_FAILED, JOB_IGNORED)

EVENT_HEADER = "X-CTP-Node-Event"
DELIVERY_HEADER = "X-CTP-Node-Delivery"
TIMESTAMP_HEADER = "X-CTP-Node-Timestamp"
SIGNATURE_HEADER = "X-CTP-Node-Signature"

RETRIED_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The value of X-CTP-Node-Signature for this body signed at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, body: bytes, timestamp: str, signed: str, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """For receivers: True when ``signed`` (X-CTP-Node-Signature) matches and the timestamp is recent."""
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        return False
    if abs(age) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), signed)


class WebhookMetrics:
    """The webhook counters, created once per registry (a process may build several notifiers)."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, WebhookMetrics] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.notifications = Counter(
            "ctp_node_webhook_notifications",
            "Webhook notifications by how they ended: delivered, failed (given up), dropped (queue full, stopping)",
            ["webhook", "event", "outcome"],
            registry=registry,
        )
        self.attempt_failures = Counter(
            "ctp_node_webhook_attempt_failures",
            "Webhook POSTs that failed (connection, timeout, non-2xx), retried or not",
            ["webhook", "event"],
            registry=registry,
        )

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> WebhookMetrics:
        if registry is None:
            return cls(None)
        with cls._lock:
            metrics = cls._by_registry.get(registry)
            if metrics is None:
                metrics = cls._by_registry[registry] = cls(registry)
            return metrics


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    webhook: str = field(compare=False)
    event: str = field(compare=False)
    delivery_id: str = field(compare=False)
    body: bytes = field(compare=False)
    job_id: int | None = field(compare=False)
    attempt: int = field(default=0, compare=False)


class _Try:
    """One attempt's deadline: when it passes, the sockets the attempt uses are shut down, which ends
    any read in progress (a per-read socket timeout never fires against a receiver that trickles)."""

    def __init__(self, timeout_s: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Try:
        _current.attempt = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.attempt = None

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


_current = threading.local()  # the _Try of the attempt this thread is making, if any


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    attempt: _Try | None = getattr(_current, "attempt", None)
    if attempt is not None:
        attempt.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    """Hands its socket to the current attempt's deadline: a new one when made, a reused one per request."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)  # the TCP socket; shutting it down ends TLS reads on top of it too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _watch(self.sock)  # a kept-alive connection from an earlier try (None when not yet connected)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection, _WatchedHTTPConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connections whose sockets an attempt's deadline can shut down."""

    _pools = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):  # HTTP(S) proxies; not SOCKS
            manager.pool_classes_by_scheme = self._pools
        return manager


def job_facts(job: SeriesJob) -> dict[str, Any]:
    """What a notification says about a job: identifiers, state and counts; nothing about the patient."""
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "state": job.state.value,
        "generation": job.generation,
        "instances": job.instances,
        "attempts": job.attempts,
        "warning": job.warning,
        "guardrail": job.guardrail,
    }


class Notifier:
    """Queues webhook notifications and sends them from one background thread per webhook.

    Secrets are read at construction (ConfigError names the variable or file when one is missing), so
    a misconfigured webhook stops the node at start rather than failing silently later.
    """

    def __init__(
        self,
        settings: NotifySettings,
        node: str = "",
        registry: CollectorRegistry | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.metrics = WebhookMetrics.of(registry)
        self._hooks: dict[str, Webhook] = {w.name: w for w in settings.webhooks}
        self._secrets = {w.name: w.secret.read() for w in settings.webhooks}
        self._session = session or requests.Session()
        adapter = _DeadlineAdapter()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._heaps: dict[str, list[_Pending]] = {name: [] for name in self._hooks}  # per webhook
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True, name=f"webhook-{name}")
            for name in self._hooks
        ]
        for thread in self._threads:
            thread.start()

    # The events --------------------------------------------------------------------------------

    def series_received(self, job: SeriesJob) -> None:
        """The series is complete (queued for processing) with ``job.instances`` instances."""
        self.notify(SERIES_RECEIVED, job)

    def result_delivered(self, job: SeriesJob, destination: str, instances: int | None = None) -> None:
        """The result of ``job`` was stored at ``destination`` (``instances`` of them)."""
        self.notify(RESULT_DELIVERED, job, destination=destination, instances_sent=instances)

    def job_delivered(self, job: SeriesJob, destinations: list[str]) -> None:
        """Every destination has the result of ``job`` (now done)."""
        self.notify(JOB_DELIVERED, job, destinations=destinations)

    def failed(self, job: SeriesJob, reason: str, destination: str | None = None) -> None:
        """``job`` ended failed, or its delivery to ``destination`` was given up; a job the store
        marked ignored (not a perfusion series) is ``job.ignored`` instead, never a failure."""
        if job.state is State.IGNORED and destination is None:
            self.notify(JOB_IGNORED, job, reason=reason)
            return
        self.notify(JOB_FAILED, job, reason=reason, destination=destination)

    def notify(self, event: str, job: SeriesJob, **facts: Any) -> None:
        """Queue ``event`` for every webhook subscribed to it; returns at once."""
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}; one of {', '.join(EVENTS)}")
        hooks = [w for w in self._hooks.values() if event in w.events]
        if not hooks:
            return
        delivery_id = str(uuid.uuid4())
        payload = {
            "event": event,
            "id": delivery_id,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "node": self.node,
            "job": job_facts(job),
            **{k: v for k, v in facts.items() if v is not None},
        }
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        now = time.monotonic()
        with self._cond:
            if self._closed:
                for hook in hooks:
                    self._count(hook.name, event, "dropped")
                log.warning("webhook %s for job %d dropped: the notifier is stopped", event, job.id)
                return
            for hook in hooks:
                self._push(_Pending(now, next(self._seq), hook.name, event, delivery_id, body, job.id))
            self._cond.notify_all()  # one thread per webhook waits

    # Life cycle --------------------------------------------------------------------------------

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until nothing is queued or being sent (retries included); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while any(self._heaps.values()) or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is due within ``timeout_s``, then stop; what is left is logged and counted dropped."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._in_flight or any(p.due <= time.monotonic() for h in self._heaps.values() for p in h):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            self._closed = True
            left = [p for heap in self._heaps.values() for p in heap]
            for heap in self._heaps.values():
                heap.clear()
            self._cond.notify_all()
        for pending in left:
            self._count(pending.webhook, pending.event, "dropped")
        if left:
            log.warning("%d webhook notifications dropped at stop (still waiting for a retry)", len(left))
        join_until = max(deadline, time.monotonic()) + self.settings.timeout_s
        for thread in self._threads:
            thread.join(timeout=max(join_until - time.monotonic(), 0))

    # Sending ------------------------------------------------------------------------------------

    def _push(self, pending: _Pending) -> None:
        if sum(len(heap) for heap in self._heaps.values()) >= self.settings.max_pending:
            oldest = min((p for heap in self._heaps.values() for p in heap), key=lambda p: p.seq)
            self._heaps[oldest.webhook].remove(oldest)
            heapq.heapify(self._heaps[oldest.webhook])
            self._count(oldest.webhook, oldest.event, "dropped")
            log.error(
                "webhook %s: %s for job %s dropped, %d notifications already waiting",
                oldest.webhook, oldest.event, oldest.job_id, self.settings.max_pending,
            )  # fmt: skip
        heapq.heappush(self._heaps[pending.webhook], pending)

    def _count(self, webhook: str, event: str, outcome: str) -> None:
        self.metrics.notifications.labels(webhook, event, outcome).inc()

    def _run(self, webhook: str) -> None:
        heap = self._heaps[webhook]
        while True:
            with self._cond:
                while not self._closed and (not heap or heap[0].due > time.monotonic()):
                    self._cond.wait(None if not heap else heap[0].due - time.monotonic())
                if self._closed:
                    return
                pending = heapq.heappop(heap)
                self._in_flight += 1
            try:
                retry_in = self._attempt(pending)
            except Exception:  # never let one notification end the thread
                log.exception("webhook %s: unexpected error sending %s", pending.webhook, pending.event)
                retry_in = None
                self._count(pending.webhook, pending.event, "failed")
            with self._cond:
                self._in_flight -= 1
                if retry_in is not None and not self._closed:
                    pending.due, pending.seq = time.monotonic() + retry_in, next(self._seq)
                    self._push(pending)
                elif retry_in is not None:
                    self._count(pending.webhook, pending.event, "dropped")
                self._cond.notify_all()

    def _backoff_s(self, attempt: int) -> float:
        return min(self.settings.initial_backoff_s * 2 ** (attempt - 1), self.settings.max_backoff_s)

    def _attempt(self, pending: _Pending) -> float | None:
        """POST once; the delay before the next try, or None when done (delivered or given up)."""
        hook = self._hooks[pending.webhook]
        pending.attempt += 1
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ctp-node-webhook",
            EVENT_HEADER: pending.event,
            DELIVERY_HEADER: pending.delivery_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self._secrets[hook.name], timestamp, pending.body),
        }
        retry_after: float | None = None
        try:
            with _Try(self.settings.timeout_s) as attempt:
                response = self._session.post(
                    hook.url,
                    data=pending.body,
                    headers=headers,
                    timeout=self.settings.timeout_s,  # per connect and per read; _Try bounds the whole try
                    allow_redirects=False,  # a redirect would send the signed body somewhere not configured
                    verify=str(hook.ca_certificates) if hook.ca_certificates else True,
                    stream=True,  # the status and headers are all it needs: the body is not read
                )
                response.close()
        except requests.RequestException as exc:
            problem, retryable = f"{type(exc).__name__}", True
            if attempt.expired:
                problem = f"Timeout: no answer within {self.settings.timeout_s:g} s ({problem})"
        else:
            if 200 <= response.status_code < 300:
                self._count(hook.name, pending.event, "delivered")
                log.debug("webhook %s: %s for job %s delivered", hook.name, pending.event, pending.job_id)
                return None
            problem, retryable = f"HTTP {response.status_code}", response.status_code in RETRIED_HTTP_STATUSES
            header = response.headers.get("Retry-After", "")
            if header.isdigit():
                retry_after = float(header)
        self.metrics.attempt_failures.labels(hook.name, pending.event).inc()
        if retryable and pending.attempt < self.settings.max_attempts:
            delay = min(max(retry_after or 0.0, self._backoff_s(pending.attempt)), self.settings.max_backoff_s)
            log.warning(
                "webhook %s: %s for job %s failed (%s, attempt %d of %d); next try in %.0f s",
                hook.name, pending.event, pending.job_id, problem, pending.attempt, self.settings.max_attempts, delay,
            )  # fmt: skip
            return delay
        self._count(hook.name, pending.event, "failed")
        log.error(
            "webhook %s: %s for job %s given up after %d attempts (%s)%s",
            hook.name, pending.event, pending.job_id, pending.attempt, problem,
            "" if retryable else ": the receiver refused it, check its URL and secret",
        )  # fmt: skip
        return None
