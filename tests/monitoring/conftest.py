"""Fixtures of the monitoring tests: Prometheus's own tools, and a live server with deployments.

``promtool`` and ``prometheus`` come from Debian's prometheus package (scripts/system-packages.sh
installs it); the tests that need them skip where it is missing, except in CI (CI=true), where
that is a failure - the pattern of the PostgreSQL tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from shipyard.context import Context, open_context
from shipyard.domain.models import Deployment, DeploymentStatus
from shipyard.security import principals
from shipyard.security.tokens import create_token
from shipyard.serving import launcher, reconciler
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.tracking.registry import register_version
from tests.conftest import LiveServer
from tests.onnx_models import linear_model

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "shipyard-serving.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "shipyard-serving.rules.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "shipyard-serving.json"

# The metrics the rules and the dashboard read, by who must export them (sample names).
REPLICA_METRICS = {
    "shipyard_serving_requests_total",  # {deployment, model, version, code}
    "shipyard_serving_request_duration_seconds_bucket",  # {deployment, model, version, le}
    "shipyard_serving_shed_requests_total",  # {deployment, model, version, reason}
    "shipyard_serving_batch_size_bucket",
    "shipyard_serving_batch_size_sum",
    "shipyard_serving_batch_size_count",
    "shipyard_serving_inference_duration_seconds_bucket",
    "shipyard_serving_model_ready",
    "shipyard_serving_queued_rows",
    "shipyard_serving_in_flight_requests",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}
SERVER_METRICS = {
    "shipyard_http_requests_total",  # {method, route, code}
    "shipyard_http_request_duration_seconds_bucket",  # {method, route, le}
    "shipyard_store_up",
    "shipyard_deployments",  # {status}
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}


def prometheus_tool(name: str) -> str:
    """The path of ``name`` (promtool, prometheus); skip without it, fail in CI."""
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None
    )
    if path is not None:
        return path
    reason = (
        f"{name} is not installed (Debian: apt-get install prometheus; scripts/system-packages.sh)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI needs {name}: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_tool("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return prometheus_tool("prometheus")


@dataclass
class Served:
    """A live server (auth on) over a home with two projects, each serving one deployment."""

    server: LiveServer
    ctx: Context
    tokens: dict[str, str]  # admin | viewer (of vision) | outsider (member of nothing)
    deployments: dict[str, Deployment]  # project -> its one deployment, settled (running)

    def client(self, who: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("monitoring") / "home"
    home.mkdir()
    settings = Settings(home=home)
    ctx = open_context(settings, actor="admin")
    tokens = {"admin": create_token(ctx, name="prometheus")[1]}
    for project, model, seed in (("vision", "digits", 1), ("speech", "words", 2)):
        principals.create_project(ctx, name=project)
        digest = ctx.blobs.put_bytes(linear_model(seed=seed).data).digest
        register_version(ctx, project=project, model=model, digest=digest)
    for name in ("viewer", "outsider"):
        principals.create_principal(ctx, name=name)
        tokens[name] = create_token(ctx, name=f"{name}-token", principal=name)[1]
    principals.set_member(ctx, project="vision", principal="viewer", role="viewer")
    server = LiveServer(home, auth=True)
    served = Served(server=server, ctx=ctx, tokens=tokens, deployments={})
    try:
        with served.client() as http:
            wanted = (("vision", "web", "digits"), ("speech", "asr", "words"))
            for project, name, model in wanted:
                response = http.post(
                    f"/api/v1/projects/{project}/deployments",
                    json={"name": name, "model": model, "ref": "1", "max_wait_ms": 1},
                )
                assert response.status_code == 201, response.text
            # the passes a server's reconcile loop runs (guarded: two never clash); the first
            # starts both replicas at once
            reconciler.reconcile_once(ctx)
            for project, name, _ in wanted:
                settled = reconciler.settle(ctx, project=project, name=name)
                assert settled.status is DeploymentStatus.RUNNING, settled.message
                served.deployments[project] = settled
        yield served
    finally:
        with served.client() as http:
            for project, deployment in served.deployments.items():
                http.post(f"/api/v1/projects/{project}/deployments/{deployment.name}/stop")
        server.stop()
        _stop_stray_replicas(home)
        forget_database(settings.database_url)


def _stop_stray_replicas(home: Path) -> None:
    """Replicas outlive the server that started them: stop any left over from a failed test."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if "shipyard.serving.replica" in cmdline and str(home) in cmdline:
                launcher.stop_process_group(proc.pid, proc.create_time(), grace=2)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
