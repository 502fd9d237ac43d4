"""Prometheus metrics: what was received and refused, jobs by state, processing and sending.

Jobs by state are read from the job store at each scrape, so one receiver's endpoint shows the work
of every worker sharing the store. Each process uses its own registry (no module-level state).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ctp_node.config import MetricsSettings
from ctp_node.node.shared.jobs_read import JobQueries

# Each label value is a time series kept for the life of the process: a peer that calls with ever new
# AE titles (300 made /metrics grow from 2.2 to 43.9 KB) must not grow it without bound. The first
# titles keep their own label; the rest are counted together (the audit trail names every one).
MAX_CALLING_AE_LABELS = 20
OTHER_CALLING_AE = "(other)"


class _JobStateCollector(Collector):
    def __init__(self, queries: JobQueries) -> None:
        self.queries = queries

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("ctp_node_jobs", "Series jobs by state", labels=["state"])
        for state, count in sorted(self.queries.counts().items()):
            family.add_metric([state], count)
        yield family


class NodeMetrics:
    def __init__(self, queries: JobQueries | None = None) -> None:
        """``queries``: the job store's read side, for the jobs by state (none: no such gauge)."""
        self.registry = CollectorRegistry()
        self.received = Counter(
            "ctp_node_received_instances", "Instances stored in the spool", ["calling_ae"], registry=self.registry
        )
        # reason: disk, job_store, object_store (0xA700); missing_uid, invalid_uid, uid_mismatch, sop_class,
        # unreadable (0xC000), as ctp_node.node.receive.scp.handle_store answers them.
        self.refused = Counter(
            "ctp_node_refused_instances", "C-STORE requests answered with a failure", ["reason"], registry=self.registry
        )
        # Back-pressure (ctp_node.node.shared.health): 0 while the node refuses instances for want of it.
        self.resource_available = Gauge(
            "ctp_node_resource_available",
            "1 while the resource can keep received instances (disk above its floor, job store, object store)",
            ["resource"],
            registry=self.registry,
        )
        self.processing = Histogram(
            "ctp_node_processing_seconds",
            "Assemble + inpaint + write per series",
            registry=self.registry,
            buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
        )
        self.sent = Counter("ctp_node_sent_series", "Series delivered", ["destination"], registry=self.registry)
        self.send_failures = Counter(
            "ctp_node_send_failures", "Failed delivery attempts", ["destination"], registry=self.registry
        )
        self.failures = Counter(
            "ctp_node_job_failures", "Jobs ended failed or ignored", ["kind"], registry=self.registry
        )
        if queries is not None:
            self.registry.register(_JobStateCollector(queries))
        self._calling_aes: set[str] = set()
        self._lock = threading.Lock()

    def count_received(self, calling_ae: str, count: int = 1) -> None:
        """Count stored instances under their calling AE title's label (bounded: ``MAX_CALLING_AE_LABELS``)."""
        with self._lock:
            if calling_ae not in self._calling_aes and len(self._calling_aes) < MAX_CALLING_AE_LABELS:
                self._calling_aes.add(calling_ae)
            label = calling_ae if calling_ae in self._calling_aes else OTHER_CALLING_AE
        self.received.labels(label).inc(count)

    def resource_changed(self, resource: str, available: bool) -> None:
        """``ResourceHealth``'s ``on_change``: the gauge follows each resource."""
        self.resource_available.labels(resource).set(1 if available else 0)

    def describe_worker(self, worker_id: str, device: str) -> None:
        """``ctp_node_worker_info{worker, device}``: marks this endpoint as a worker's. The receiver
        exports the same processing and sending series (at zero), so only this tells a dashboard which
        scrape targets are workers (deploy/grafana/ctp-node.json lists its workers by it)."""
        info = Info("ctp_node_worker", "This process is a GPU worker: its id and device", registry=self.registry)
        info.info({"worker": worker_id, "device": device})

    def serve(self, settings: MetricsSettings) -> None:
        if settings.port is not None:
            start_http_server(settings.port, addr=settings.bind_address, registry=self.registry)
