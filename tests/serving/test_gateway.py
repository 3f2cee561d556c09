"""The gateway: one front door on the server, with auth, weighted routing, request ids, the
serving version named, and retries when a replica dies under load. Real server, real replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from shipyard.domain.models import (
    DeploymentSpec,
    DeploymentStatus,
    DeploymentTarget,
    ReplicaState,
)
from shipyard.errors import NotFoundError, PermissionDeniedError
from shipyard.serving import launcher, reconciler
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import LinearModel, linear_model
from tests.serving.gateway_helpers import Load, ThreadServer, request_body
from tests.serving.test_deployments import stop_stray_replicas

MODELS = {1: linear_model(seed=21), 2: linear_model(seed=22)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """A server with deployment 'web' of 'digits': v1 and v2, 50% each, one replica each."""
    home = Path(tmp_path_factory.mktemp("gateway")) / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler, "RESTART_BACKOFF_S", 0.2)
        running = ThreadServer(home)
        ctx = running.ctx
        for linear in MODELS.values():
            digest = ctx.blobs.put_bytes(linear.data).digest
            register_version(ctx, project="default", model="digits", digest=digest)
        set_alias(ctx, project="default", model="digits", alias="production", version=1)
        spec = DeploymentSpec(
            targets=[
                DeploymentTarget(alias="production", weight=50),
                DeploymentTarget(version=2, weight=50),
            ]
        )
        with running.client() as client:
            deployed = client.deployments.create("web", model="digits", spec=spec, timeout=90)
        assert deployed.status is DeploymentStatus.RUNNING, deployed.message
        yield running
        with running.client() as client:
            client.deployments.stop("web")
        running.stop()
    stop_stray_replicas()


def expected(version: int, x: np.ndarray) -> np.ndarray:
    linear: LinearModel = MODELS[version]
    return linear.reference(x)


def test_predict_through_the_gateway_names_the_version_and_carries_the_request_id(
    server: ThreadServer,
) -> None:
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    with server.client(server.reader_token) as reader:
        deployment = reader.deployments.get("web")
        assert deployment.url == server.url  # the gateway, not a replica
        answer = reader.deployments.predict("web", request_body(x), request_id="req-1")
    version = int(answer["model_version"])
    assert answer["shipyard"] == {"request_id": "req-1", "model_version": str(version)}
    out = answer["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_array_equal(got, expected(version, x))

    auth = {"Authorization": f"Bearer {server.reader_token}"}
    for path in ("/v2/models/web/infer", "/projects/default/v2/models/web/infer"):
        raw = httpx.post(f"{server.url}{path}", json=request_body(x), headers=auth)
        assert raw.status_code == 200, raw.text
        assert raw.headers["x-request-id"]  # one is made when the caller sends none
        assert raw.headers["x-shipyard-model-version"] == raw.json()["model_version"]
    meta = httpx.get(f"{server.url}/v2/models/web", headers=auth)
    assert meta.status_code == 200 and meta.json()["name"] == "web"

    refused = httpx.post(f"{server.url}/v2/models/web/infer", json=request_body(x))
    assert refused.status_code == 401
    missing = httpx.post(f"{server.url}/v2/models/nope/infer", json={}, headers=auth)
    assert missing.status_code == 404 and "'nope' does not exist" in missing.text
    other = httpx.post(f"{server.url}/projects/secret/v2/models/web/infer", json={}, headers=auth)
    assert other.status_code == 404  # a project the token cannot see does not exist for it
    bad = httpx.post(f"{server.url}/v2/models/web/infer", json={"inputs": []}, headers=auth)
    assert bad.status_code == 400  # the replica's own OIP error, passed through
    with server.client(server.reader_token) as reader:
        with pytest.raises(PermissionDeniedError):  # a viewer may predict, not deploy
            reader.deployments.scale("web", min=2)
        with pytest.raises(NotFoundError):
            reader.deployments.predict("nope", request_body(x))


def test_traffic_follows_the_weights(server: ThreadServer) -> None:
    auth = {"Authorization": f"Bearer {server.reader_token}"}
    body = request_body(np.zeros((1, 64), dtype=np.float32))
    served: Counter[str] = Counter()
    with httpx.Client(headers=auth) as client:
        for _ in range(20):
            r = client.post(f"{server.url}/v2/models/web/infer", json=body)
            assert r.status_code == 200, r.text
            served[r.headers["x-shipyard-model-version"]] += 1
    assert served == {"1": 10, "2": 10}


def test_the_cli_predicts_against_a_remote_server_with_a_token(
    server: ThreadServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SHIPYARD_URL": server.url,
        "SHIPYARD_TOKEN": server.reader_token,
        "SHIPYARD_HOME": str(tmp_path / "cli-home"),
    }
    rows = [[0.25] * 64]
    out = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "predict", "web", "--data", json.dumps(rows),
         "--request-id", "cli-1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["shipyard"]["request_id"] == "cli-1"
    version = int(answer["model_version"])
    got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, expected(version, np.asarray(rows, np.float32)).ravel())


def test_a_replica_that_dies_under_load_costs_no_request_and_is_restarted(
    server: ThreadServer,
) -> None:
    with server.client() as client:
        before = {r.version: r for r in client.deployments.get("web").replicas}
        victim = before[1]
        assert victim.pid is not None and victim.state is ReplicaState.READY
        with Load(f"{server.url}/v2/models/web/infer", server.reader_token) as load:
            load.wait_for_more(20)
            os.killpg(victim.pid, signal.SIGKILL)
            load.wait_for_more(40)

            def restarted() -> bool:
                replicas = {r.version: r for r in client.deployments.get("web").replicas}
                again = replicas.get(1)
                return bool(again and again.restarts == 1 and again.state is ReplicaState.READY)

            wait_for(restarted, timeout=60, what="the killed replica to be restarted")
            load.wait_for_more(20)
        assert load.failures == [], load.failures[:5]
        assert load.ok["1"] > 0 and load.ok["2"] > 0
        after = {r.version: r for r in client.deployments.get("web").replicas}
    assert after[1].id == victim.id and after[1].pid != victim.pid
    assert not launcher.is_alive(victim.pid, None)
    assert after[2].restarts == 0 and after[2].pid == before[2].pid
