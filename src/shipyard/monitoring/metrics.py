"""Prometheus metrics of the server: HTTP traffic, and the platform's state read at scrape time.

Each app gets its own :class:`CollectorRegistry` (no process-global state, so two apps in one
process - or a test that builds many - never share or clash on collectors). HTTP requests are
counted by method, route *template* (``/api/v1/runs/{run_id}``, never the raw path, so ids cannot
blow up the label space) and status ``code`` (the label the replicas' request counters use too),
with a latency histogram. The process itself is exported as well (``process_*``: CPU, resident
memory, open files; ``python_info``, ``python_gc_*``), as prometheus_client's default collectors
do for its global registry. The state gauges (jobs by state,
runs by status, models, versions, deployments, datasets) are not kept in memory: the custom
collector counts them in the database on every scrape, so they are right even when other
processes (the CLI, job supervisors) change the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from enum import Enum

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus, JobStatus, RunStatus
from shipyard.store.tables import (
    DatasetRow,
    DatasetVersionRow,
    DeploymentRow,
    JobRow,
    ModelRow,
    ModelVersionRow,
    RunRow,
)

log = logging.getLogger("shipyard.monitoring")

UNMATCHED_ROUTE = "<unmatched>"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The collectors of one server app and their Prometheus text rendering."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, ctx: Context | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shipyard_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shipyard_http_request_duration_seconds",
            "Time from request start to the end of the response, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        add_process_collectors(self.registry)
        if ctx is not None:
            self.registry.register(StoreCollector(ctx))

    def observe(self, *, method: str, route: str, code: int, seconds: float) -> None:
        self.requests.labels(method, route, str(code)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def add_process_collectors(registry: CollectorRegistry) -> None:
    """Export the running process on ``registry``: ``process_*`` (CPU seconds, resident and
    virtual memory, open and max file descriptors, start time; Linux only), ``python_info`` and
    ``python_gc_*`` - what prometheus_client puts on its global registry by default."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class StoreCollector(Collector):
    """Counts of the platform's resources, queried from the database at scrape time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "shipyard_store_up", "1 when the metadata store answered this scrape, else 0."
        )
        try:
            with self.ctx.db.read() as s:
                families = list(_store_families(s))
        except Exception:
            log.exception("metrics scrape: the metadata store did not answer")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def _store_families(s: Session) -> Iterator[Metric]:
    yield _by_state(
        s, "shipyard_jobs", "Jobs in the store, by state.", JobRow.status, "state", JobStatus
    )
    yield _by_state(
        s, "shipyard_runs", "Runs in the store, by status.", RunRow.status, "status", RunStatus
    )
    yield _by_state(
        s,
        "shipyard_deployments",
        "Deployments in the store, by status.",
        DeploymentRow.status,
        "status",
        DeploymentStatus,
    )
    for name, doc, column in (
        ("shipyard_models", "Registered models.", ModelRow.id),
        ("shipyard_model_versions", "Registered model versions.", ModelVersionRow.id),
        ("shipyard_datasets", "Datasets.", DatasetRow.id),
        ("shipyard_dataset_versions", "Dataset versions.", DatasetVersionRow.id),
    ):
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], s.scalar(select(func.count(column))) or 0)
        yield family


def _by_state(
    s: Session, name: str, doc: str, column: object, label: str, states: Iterable[Enum]
) -> GaugeMetricFamily:
    counts = {str(state.value): 0 for state in states}
    for value, count in s.execute(select(column, func.count()).group_by(column)):  # type: ignore[call-overload]
        counts[str(value)] = count
    family = GaugeMetricFamily(name, doc, labels=[label])
    for state, count in counts.items():
        family.add_metric([state], count)
    return family


class MetricsMiddleware:
    """Record every HTTP request (count and latency) under its route template."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(
                method=scope["method"],
                route=route_template(scope),
                code=status,
                seconds=time.perf_counter() - start,
            )


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``<unmatched>``; never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not template:
        return UNMATCHED_ROUTE
    if isinstance(route, Mount):
        return f"{template}/{{path}}"
    return str(template)
