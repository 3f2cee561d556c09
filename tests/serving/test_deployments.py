"""Deployments through the service: real registry, real SQLite, real replica processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from shipyard.context import Context
from shipyard.domain.models import Deployment, DeploymentStatus
from shipyard.errors import (
    BackendError,
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
)
from shipyard.security.audit import list_events, verify_chain
from shipyard.serving import launcher
from shipyard.serving.deployments import (
    deploy,
    get_deployment,
    list_deployments,
    start_replica,
    stop_deployment,
)
from shipyard.store.queries import edges_of
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import LinearModel, linear_model

PROJECT = "vision"


@pytest.fixture(autouse=True)
def no_stray_replicas() -> Iterator[None]:
    """Whatever a test leaves running (a failed assertion before stop) is killed afterwards."""
    yield
    for child in psutil.Process().children(recursive=True):
        try:
            if "shipyard.serving.replica" in " ".join(child.cmdline()):
                launcher.stop_process_group(child.pid, child.create_time(), grace=2)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def model(ctx: Context) -> LinearModel:
    """Version 1 of model 'digits' in project 'vision', aliased 'production'."""
    linear = linear_model(seed=11)
    digest = ctx.blobs.put_bytes(linear.data).digest
    register_version(ctx, project=PROJECT, model="digits", digest=digest)
    set_alias(ctx, project=PROJECT, model="digits", alias="production", version=1)
    return linear


def _infer(url: str, name: str, x: np.ndarray) -> np.ndarray:
    payload = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}  # fmt: skip
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=payload, timeout=10)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_deploy_serve_and_stop(ctx: Context, model: LinearModel) -> None:
    deployment = deploy(ctx, project=PROJECT, name="web", model="digits", max_wait_ms=2)
    assert deployment.status is DeploymentStatus.RUNNING
    assert deployment.model == "digits" and deployment.version == 1
    assert deployment.alias == "production"
    assert deployment.url is not None and deployment.url.startswith("http://127.0.0.1:")
    assert deployment.pid is not None and psutil.pid_exists(deployment.pid)
    assert deployment.created_by == "tester"

    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(_infer(deployment.url, "web", x), model.reference(x))
    meta = httpx.get(f"{deployment.url}/v2/models/web").json()
    assert meta["versions"] == ["1"]

    assert get_deployment(ctx, project=PROJECT, name="web") == deployment
    assert list_deployments(ctx, project=PROJECT) == [deployment]

    # a second deploy of a running name is refused, and changes nothing
    with pytest.raises(ConflictError, match=r"already running .* stop it first") as info:
        deploy(ctx, project=PROJECT, name="web", model="digits")
    assert info.value.field == "name"
    assert get_deployment(ctx, project=PROJECT, name="web") == deployment

    log = ctx.settings.deployments_dir / PROJECT / "web" / "replica.log"
    assert "loaded 'web' version 1" in log.read_text()

    stopped = stop_deployment(ctx, project=PROJECT, name="web")
    assert stopped.status is DeploymentStatus.STOPPED
    assert stopped.url is None and stopped.pid is None
    assert not launcher.is_alive(deployment.pid, None)
    assert not psutil.pid_exists(deployment.pid)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{deployment.url}/v2/health/live", timeout=2)
    with pytest.raises(InvalidStateError, match="already stopped"):
        stop_deployment(ctx, project=PROJECT, name="web")

    with ctx.db.read() as s:
        actions = [(e.action, e.resource) for e in list_events(s, limit=1000)]
        assert ("deployment.create", f"project/{PROJECT}/deployment/web") in actions
        assert ("deployment.stop", f"project/{PROJECT}/deployment/web") in actions
        assert verify_chain(s) is None
        edges = edges_of(s, kind="deployment", id=deployment.id)
        assert [(e.source_kind, e.relation) for e in edges] == [("model_version", "serves")]


def test_redeploy_by_version_number_after_stop(ctx: Context, model: LinearModel) -> None:
    first = deploy(ctx, project=PROJECT, name="web", model="digits")
    stop_deployment(ctx, project=PROJECT, name="web")
    second = deploy(ctx, project=PROJECT, name="web", model="digits", ref="1")
    try:
        assert second.id == first.id  # the same deployment, started again
        assert second.status is DeploymentStatus.RUNNING and second.alias is None
        assert second.pid != first.pid
        x = np.ones((1, 64), dtype=np.float32)
        assert second.url is not None
        np.testing.assert_array_equal(_infer(second.url, "web", x), model.reference(x))
    finally:
        stop_deployment(ctx, project=PROJECT, name="web")


def test_a_replica_that_dies_is_reported_failed_and_can_be_replaced(
    ctx: Context, model: LinearModel
) -> None:
    deployment = deploy(ctx, project=PROJECT, name="web", model="digits")
    assert deployment.pid is not None
    os.killpg(deployment.pid, signal.SIGKILL)

    def reported_failed() -> Deployment | None:
        current = get_deployment(ctx, project=PROJECT, name="web")
        return current if current.status is DeploymentStatus.FAILED else None

    failed = wait_for(reported_failed, what="the deployment to show FAILED")
    assert "replica exited" in failed.message and failed.url is None
    again = deploy(ctx, project=PROJECT, name="web", model="digits")
    assert again.status is DeploymentStatus.RUNNING
    stop_deployment(ctx, project=PROJECT, name="web")


def test_a_replica_that_cannot_load_fails_the_deployment_with_its_log(
    ctx: Context, model: LinearModel
) -> None:
    digest = ctx.blobs.put_bytes(linear_model(seed=12).data).digest
    assert register_version(ctx, project=PROJECT, model="digits", digest=digest).version == 2
    blob = Path(ctx.blobs.root, digest[:2], digest[2:4], digest)
    blob.write_bytes(blob.read_bytes()[:100])  # corrupt it after registration

    with pytest.raises(BackendError) as info:
        deploy(ctx, project=PROJECT, name="broken", model="digits", ref="2")
    message = info.value.message
    assert "exited with status 1 before it was ready" in message
    assert "is corrupted" in message  # the tail of the replica's log
    assert "replica.log" in message
    failed = get_deployment(ctx, project=PROJECT, name="broken")
    assert failed.status is DeploymentStatus.FAILED and "is corrupted" in failed.message
    assert failed.pid is None and failed.url is None


def test_bad_inputs_are_refused_before_anything_is_recorded(
    ctx: Context, model: LinearModel
) -> None:
    with pytest.raises(InvalidInputError) as info:
        deploy(ctx, project=PROJECT, name="../web", model="digits")
    assert info.value.field == "name"
    with pytest.raises(InvalidInputError) as info:
        deploy(ctx, project=PROJECT, name="web", model="digits", max_batch_size=0)
    assert info.value.field == "max_batch_size"
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        deploy(ctx, project=PROJECT, name="web", model="digits", ref="staging")
    with pytest.raises(NotFoundError):
        deploy(ctx, project=PROJECT, name="web", model="faces")
    with pytest.raises(NotFoundError, match="deployment 'web' does not exist"):
        get_deployment(ctx, project=PROJECT, name="web")
    with pytest.raises(NotFoundError):
        stop_deployment(ctx, project=PROJECT, name="web")
    assert list_deployments(ctx, project=PROJECT) == []
    with ctx.db.read() as s:
        assert not [e for e in list_events(s, limit=1000) if e.action.startswith("deployment.")]


def test_start_replica_directly_from_a_blob(ctx: Context) -> None:
    linear = linear_model(seed=13)
    digest = ctx.blobs.put_bytes(linear.data).digest
    pid, url = start_replica(ctx, name="raw", digest=digest, version=4, ready_timeout=60)
    try:
        assert httpx.get(f"{url}/v2/models/raw").json()["versions"] == ["4"]
        x = np.full((2, 64), 0.25, dtype=np.float32)
        np.testing.assert_array_equal(_infer(url, "raw", x), linear.reference(x))
    finally:
        assert launcher.stop_process_group(pid, None)
    assert not psutil.pid_exists(pid)
    assert not launcher.stop_process_group(pid, None)  # already gone: nothing to signal


def test_start_replica_of_a_missing_blob_raises_with_the_log(ctx: Context) -> None:
    with pytest.raises(BackendError, match="is not in the store") as info:
        start_replica(ctx, name="raw", digest="cd" * 32, version=1)
    assert info.value.details["log"].endswith("raw/replica.log")
