"""Prometheus service discovery: the server's ``http_sd`` route over a real socket, against real
replicas deployed through the REST API, with auth on - and a real Prometheus that finds and
scrapes them through it."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import psutil
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus, ReplicaState
from shipyard.errors import NotFoundError
from shipyard.monitoring import discovery
from shipyard.server.app import create_app
from shipyard.serving import launcher, reconciler
from shipyard.serving.deployments import deploy, get_deployment, stop_deployment
from shipyard.settings import Settings
from shipyard.tracking.registry import register_version
from tests.conftest import free_port, wait_for
from tests.monitoring.conftest import REPLICA_METRICS, SCRAPE_CONFIG, Served
from tests.onnx_models import linear_model

ALL = "/api/v1/prometheus/targets"


def _project_route(project: str) -> str:
    return f"/api/v1/projects/{project}/prometheus/targets"


def _replica_group(served: Served, project: str, model: str) -> dict[str, Any]:
    deployment = served.deployments[project]
    (replica,) = deployment.replicas
    return {
        "targets": [urlsplit(str(replica.url)).netloc],
        "labels": {
            "job": "shipyard-replica",
            "project": project,
            "deployment": deployment.name,
            "model": model,
            "version": "1",
            "replica": replica.id,
            "__scheme__": "http",
            "__metrics_path__": "/metrics",
        },
    }


def test_the_route_lists_the_server_and_every_replica(served: Served) -> None:
    with served.client("admin") as http:
        response = http.get(ALL)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    server = {
        "targets": [urlsplit(served.server.url).netloc],
        "labels": {"job": "shipyard-server", "__scheme__": "http", "__metrics_path__": "/metrics"},
    }
    assert response.json() == [
        server,
        _replica_group(served, "speech", "words"),
        _replica_group(served, "vision", "digits"),
    ]
    # each target answers where the labels say
    for group in response.json()[1:]:
        (address,) = group["targets"]
        scraped = httpx.get(f"http://{address}{group['labels']['__metrics_path__']}", timeout=10)
        assert scraped.status_code == 200
        assert "shipyard_serving_requests_total" in scraped.text


def test_a_token_lists_only_the_projects_it_may_view(served: Served) -> None:
    with served.client("viewer") as http:
        everything = http.get(ALL)
        own = http.get(_project_route("vision"))
        other = http.get(_project_route("speech"))
    assert everything.status_code == 200
    assert [g["labels"].get("project") for g in everything.json()] == [None, "vision"]
    assert own.json() == [_replica_group(served, "vision", "digits")]  # no server: one project
    # another project looks exactly like a missing one
    assert other.status_code == 404
    assert other.json()["message"] == "project 'speech' does not exist"

    with served.client("outsider") as http:
        assert [g["labels"]["job"] for g in http.get(ALL).json()] == ["shipyard-server"]
        assert http.get(_project_route("vision")).status_code == 404


def test_no_token_no_targets(served: Served) -> None:
    with served.client(None) as anon:
        for path in (ALL, _project_route("vision")):
            response = anon.get(path)
            assert response.status_code == 401, path
            assert response.json()["code"] == "unauthenticated"
        wrong = anon.get(ALL, headers={"Authorization": "Bearer shp_not-a-token"})
        assert wrong.status_code == 401


def test_a_bad_project_name_is_refused_naming_the_field(served: Served) -> None:
    with served.client("admin") as http:
        response = http.get(_project_route("-bad"))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "project"
    assert "not a valid name" in response.json()["message"]


def test_without_auth_the_route_refuses_a_non_loopback_address(settings: Settings) -> None:
    app = create_app(settings, auth=False, scheduler=False)
    transport = httpx.ASGITransport(app=app)

    async def get(base_url: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.get(ALL)

    remote = anyio.run(get, "http://10.1.2.3:8340")
    assert remote.status_code == 403
    assert remote.json()["code"] == "permission_denied"
    local = anyio.run(get, "http://127.0.0.1:8340")
    assert local.status_code == 200
    assert [g["labels"]["job"] for g in local.json()] == ["shipyard-server"]


@pytest.fixture
def no_stray_replicas() -> Iterator[None]:
    yield
    for child in psutil.Process().children(recursive=True):
        try:
            if "shipyard.serving.replica" in " ".join(child.cmdline()):
                launcher.stop_process_group(child.pid, child.create_time(), grace=2)
        except psutil.NoSuchProcess:
            pass


def test_a_dead_replica_stays_a_target_until_it_is_stopped(
    ctx: Context, no_stray_replicas: None
) -> None:
    """Desired state: a replica that died is still wanted, so Prometheus keeps scraping it and
    its failed scrapes raise ShipyardReplicaDown; a stopped deployment is no longer wanted."""
    digest = ctx.blobs.put_bytes(linear_model(seed=3).data).digest
    register_version(ctx, project="p", model="m", digest=digest)
    deploy(ctx, project="p", name="web", model="m", ref="1", max_wait_ms=1)
    running = reconciler.settle(ctx, project="p", name="web")
    assert running.status is DeploymentStatus.RUNNING, running.message
    (replica,) = running.replicas
    assert replica.pid is not None and replica.url is not None
    (target,) = discovery.serving_targets(ctx)
    assert target.address == urlsplit(replica.url).netloc
    assert (target.labels["replica"], target.labels["version"]) == (replica.id, "1")

    pid = replica.pid
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: _gone(pid), what="the killed replica to exit")
    reconciler.reconcile_once(ctx, project="p", name="web")  # notices: FAILED, restart later
    (seen,) = get_deployment(ctx, project="p", name="web").replicas
    assert seen.state is ReplicaState.FAILED, seen
    assert discovery.serving_targets(ctx) == [target]
    assert discovery.serving_targets(ctx, project="p") == [target]

    stop_deployment(ctx, project="p", name="web")
    assert discovery.serving_targets(ctx) == []
    with pytest.raises(NotFoundError, match="project 'nope' does not exist"):
        discovery.serving_targets(ctx, project="nope")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its parent (this process) has not reaped yet."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_the_server_target_follows_its_public_url(ctx: Context) -> None:
    for url, address, scheme, path in (
        ("http://127.0.0.1:9000", "127.0.0.1:9000", "http", "/metrics"),
        ("https://ml.example.org/shipyard/", "ml.example.org:443", "https", "/shipyard/metrics"),
        ("http://[::1]:8340", "[::1]:8340", "http", "/metrics"),
    ):
        behind = dataclasses.replace(
            ctx, settings=dataclasses.replace(ctx.settings, server_url=url)
        )
        target = discovery.server_target(behind)
        assert (target.address, target.labels["__scheme__"]) == (address, scheme), url
        assert target.labels["__metrics_path__"] == path


# --- a real Prometheus ---------------------------------------------------------------------------


def _prometheus_config(served: Served, tmp: Path) -> Path:
    """deploy/prometheus/prometheus.yml pointed at the live server, refreshing every second."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (tmp / "shipyard.token").write_text(served.tokens["admin"] + "\n")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files")
    (job,) = config["scrape_configs"]
    (sd,) = job["http_sd_configs"]
    sd["url"] = served.server.url + ALL
    sd["refresh_interval"] = "1s"
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    try:
        response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.HTTPError:
        return []
    if response.status_code != 200:
        return []
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


@pytest.mark.slow
def test_a_real_prometheus_finds_and_scrapes_every_target(
    served: Served, prometheus: str, tmp_path: Path
) -> None:
    config = _prometheus_config(served, tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:

        def all_up() -> list[dict[str, Any]]:
            assert proc.poll() is None, log.read_text()
            up = _query(url, "up == 1")
            return up if len(up) == 3 else []

        up = wait_for(all_up, timeout=60, interval=0.25, what="Prometheus to scrape 3 targets")
        labels = sorted(
            ({k: v for k, v in s["metric"].items() if k != "instance"} for s in up),
            key=lambda m: (m["job"], m.get("project", "")),
        )
        assert labels == [
            {"__name__": "up", "job": "shipyard-replica", "project": "speech",
             "deployment": "asr", "model": "words", "version": "1",
             "replica": served.deployments["speech"].replicas[0].id},
            {"__name__": "up", "job": "shipyard-replica", "project": "vision",
             "deployment": "web", "model": "digits", "version": "1",
             "replica": served.deployments["vision"].replicas[0].id},
            {"__name__": "up", "job": "shipyard-server"},
        ]  # fmt: skip
        # the token reached the server's own /metrics too: its series are there
        stored = wait_for(
            lambda: _query(url, 'shipyard_store_up{job="shipyard-server"}'),
            what="the server's metrics in Prometheus",
        )
        assert stored[0]["value"][1] == "1"
        assert _query(url, 'process_resident_memory_bytes{job="shipyard-server"}')
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the labels the replica's series carry -------------------------------------------------------


def _scrape_after_one_request(served: Served) -> tuple[dict[str, Any], dict[str, Metric]]:
    """vision's replica target, and its metrics once it has answered one inference request."""
    with served.client("admin") as http:
        (group,) = http.get(_project_route("vision")).json()
    (address,) = group["targets"]
    x = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    infer = httpx.post(
        f"http://{address}/v2/models/{group['labels']['deployment']}/infer",
        json={"inputs": [x]},
        timeout=10,
    )
    assert infer.status_code == 200, infer.text
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return group, {f.name: f for f in text_string_to_metric_families(text)}


def test_the_replica_labels_agree_with_its_target(served: Served) -> None:
    group, families = _scrape_after_one_request(served)
    (sample,) = [
        s for s in families["shipyard_serving_requests"].samples if s.name.endswith("_total")
    ]
    assert set(sample.labels) == {"code", "deployment", "model", "version"}
    for label in ("deployment", "model", "version"):
        assert sample.labels[label] == group["labels"][label], label
    assert sample.labels["code"] == "200"
    (ready,) = families["shipyard_serving_model_ready"].samples
    assert set(ready.labels) == {"deployment", "model", "version"}


def test_the_replica_exports_every_metric_the_rules_and_dashboard_read(served: Served) -> None:
    _, families = _scrape_after_one_request(served)
    exported = {s.name for f in families.values() for s in f.samples}
    # a labelled counter nothing has counted yet (no request was shed) has no sample: its family
    # is declared all the same
    exported |= {f"{name}_total" for name, f in families.items() if f.type == "counter"}
    missing = REPLICA_METRICS - exported
    assert missing == set(), f"the replica does not export {sorted(missing)}"
