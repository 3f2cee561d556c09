"""Server metrics: HTTP counters by route template, and state gauges read from the store."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus, JobStatus, RunStatus
from shipyard.monitoring.metrics import UNMATCHED_ROUTE, ServerMetrics, route_template
from shipyard.store.engine import Database
from shipyard.tracking import runs


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_state_gauges_cover_every_state_and_follow_the_store(ctx: Context) -> None:
    metrics = ServerMetrics(ctx=ctx)
    samples = _samples(metrics)
    assert samples[("shipyard_store_up", ())] == 1
    for state in JobStatus:
        assert samples[("shipyard_jobs", (("state", state.value),))] == 0
    for status in RunStatus:
        assert samples[("shipyard_runs", (("status", status.value),))] == 0
    for status in DeploymentStatus:
        assert samples[("shipyard_deployments", (("status", status.value),))] == 0
    assert samples[("shipyard_models", ())] == 0

    first = runs.create_run(ctx, project="p")
    runs.create_run(ctx, project="q")
    runs.finish_run(ctx, run_id=first.id, status=RunStatus.FAILED)
    samples = _samples(metrics)  # counted again at every scrape
    assert samples[("shipyard_runs", (("status", "running"),))] == 1
    assert samples[("shipyard_runs", (("status", "failed"),))] == 1


def test_a_store_that_does_not_answer_is_reported_not_raised(ctx: Context, tmp_path: Path) -> None:
    gone = tmp_path / "missing-dir" / "nested" / "x.db"
    broken = Context(
        settings=ctx.settings,
        db=Database(create_engine(f"sqlite:///{gone}")),
        blobs=ctx.blobs,
    )
    samples = _samples(ServerMetrics(ctx=broken))
    assert samples[("shipyard_store_up", ())] == 0
    assert not any(name == "shipyard_jobs" for name, _ in samples)


def test_requests_are_counted_by_method_route_and_code() -> None:
    metrics = ServerMetrics()
    metrics.observe(method="GET", route="/api/v1/runs/{run_id}", code=200, seconds=0.01)
    metrics.observe(method="GET", route="/api/v1/runs/{run_id}", code=200, seconds=0.02)
    metrics.observe(method="GET", route="/api/v1/runs/{run_id}", code=404, seconds=0.01)
    samples = _samples(metrics)
    route = (("method", "GET"), ("route", "/api/v1/runs/{run_id}"))
    assert samples[("shipyard_http_requests_total", (("code", "200"), *route))] == 2
    assert samples[("shipyard_http_requests_total", (("code", "404"), *route))] == 1
    count = (
        "shipyard_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/api/v1/runs/{run_id}")),
    )
    assert samples[count] == 3
    # no store: no state gauges, and nothing shared with another instance
    assert not any(name == "shipyard_store_up" for name, _ in samples)
    assert not any(n.startswith("shipyard_http") for n, _ in _samples(ServerMetrics()))


def test_route_template_never_uses_the_raw_path() -> None:
    assert route_template({"type": "http", "path": "/api/v1/runs/abc"}) == UNMATCHED_ROUTE


def test_the_process_itself_is_exported() -> None:
    """CPU, memory and file descriptors of the server process, as prometheus_client's default
    registry would have them (each app's registry is its own, so they are added to it)."""
    samples = _samples(ServerMetrics())
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):  # fmt: skip
        assert samples[(name, ())] > 0, name
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_collections_total" for name, _ in samples)
