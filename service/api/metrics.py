"""Prometheus metrics: request counters here, queue and delivery gauges read from the database.

The gauges come from the database at scrape time, so they are right whichever process (SCP,
worker, API) did the work, with no multiprocess registry to keep in sync. The counters are the
process's (:data:`REGISTRY`); the gauges read the app's own database (:func:`database_registry`),
and ``/metrics`` serves both.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.core.db import Database
from service.core.models import Delivery, Instance, Job

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


def database_registry(db: Database) -> CollectorRegistry:
    """The gauges of one app, read from its database at scrape time."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db))
    return registry
