"""Prometheus metrics: request counters here, queue, delivery and worker gauges read at scrape time.

The gauges come from the database (and the broker's queue lengths) at scrape time, so they are
right whichever process (SCP, worker, API) did the work, with no multiprocess registry to keep in
sync. The counters are the process's (:data:`REGISTRY`); the gauges read the app's own database
and broker (:func:`database_registry`), and ``/metrics`` serves both.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.core import registry
from service.core.db import Database
from service.core.models import Delivery, Instance, Job
from service.core.runtime import Runtime

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "lusai_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "lusai_http_request_duration_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY
)


class DatabaseCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("lusai_jobs", "Analysis jobs by state", labels=["state"])
        deliveries = GaugeMetricFamily("lusai_deliveries", "Deliveries by state", labels=["state"])
        instances = GaugeMetricFamily("lusai_instances", "Received instances by state", labels=["state"])
        try:
            with self.db.session() as s:
                for model, fam in ((Job, jobs), (Delivery, deliveries), (Instance, instances)):
                    for state, count in s.execute(select(model.state, func.count()).group_by(model.state)):
                        fam.add_metric([str(state.value if hasattr(state, "value") else state)], count)
        except Exception:  # a scrape must not fail because the database is down; /health says so
            return
        yield jobs
        yield deliveries
        yield instances


AUDIT_FAILURES = Counter(
    "lusai_audit_write_failures_total",
    "Audit rows that could not be written (the request got a 503)",
    registry=REGISTRY,
)


class WorkersCollector(Collector):
    """Queue depths (the broker), the worker registry and the oldest queued job (the database)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._queues()
        yield from self._workers()

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "lusai_queue_depth",
            "Messages waiting in each broker queue (Redis LLEN; the embedded queue's message files)",
            labels=["queue"],
        )
        try:
            depths = self.runtime.queue.depths()
        except Exception:  # broker down: /health says so
            return
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        yield depth

    def _workers(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "lusai_worker_up",
            "1: a worker heartbeating within LUSAI_WORKER_LOST_AFTER; 0: a lost one (stopped: left out)",
            labels=["worker", "host", "device"],
        )
        in_flight = GaugeMetricFamily(
            "lusai_worker_jobs_in_flight", "Analysis jobs running under each worker", labels=["worker"]
        )
        last_seen = GaugeMetricFamily(
            "lusai_worker_last_seen_seconds", "Seconds since each worker's last heartbeat", labels=["worker"]
        )
        oldest = GaugeMetricFamily(
            "lusai_oldest_queued_job_age_seconds", "Age of the oldest queued analysis job (0: none queued)"
        )
        try:
            with self.runtime.db.session() as s:
                found = registry.workers(s, lost_after=self.runtime.settings.lost_after)
                oldest.add_metric([], registry.oldest_queued_age(s))
        except Exception:  # a scrape must not fail because the database is down; /health says so
            return
        for w in found:
            up.add_metric([w.name, w.host, w.device], 1 if w.alive else 0)
            in_flight.add_metric([w.name], len(w.jobs))
            last_seen.add_metric([w.name], w.last_seen_s)
        yield up
        yield in_flight
        yield last_seen
        yield oldest


def database_registry(runtime: Runtime) -> CollectorRegistry:
    """The gauges of one app, read from its database and broker at scrape time."""
    gauges = CollectorRegistry()
    gauges.register(DatabaseCollector(runtime.db))
    gauges.register(WorkersCollector(runtime))
    return gauges
