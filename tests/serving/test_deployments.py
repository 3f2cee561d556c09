"""Deployments through the service: real registry, real SQLite, real replica processes.

``deploy`` records desired state and returns at once; ``reconciler.settle`` runs the passes an
embedded home runs inline (a server runs them in the background).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from shipyard.context import Context
from shipyard.domain.models import (
    DeploymentSpec,
    DeploymentStatus,
    DeploymentTarget,
    ReplicaBounds,
    ReplicaState,
)
from shipyard.errors import (
    BackendError,
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
)
from shipyard.security.audit import list_events, verify_chain
from shipyard.serving import launcher, reconciler
from shipyard.serving.deployments import (
    deploy,
    get_deployment,
    list_deployments,
    start_replica,
    stop_deployment,
    update_deployment,
)
from shipyard.store.queries import edges_of
from shipyard.tracking.registry import register_version, set_alias
from tests.onnx_models import LinearModel, linear_model

PROJECT = "vision"


def stop_stray_replicas() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            if "shipyard.serving.replica" in " ".join(child.cmdline()):
                launcher.stop_process_group(child.pid, child.create_time(), grace=2)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(autouse=True)
def no_stray_replicas() -> Iterator[None]:
    """Whatever a test leaves running (a failed assertion before stop) is killed afterwards."""
    yield
    stop_stray_replicas()


@pytest.fixture
def model(ctx: Context) -> LinearModel:
    """Version 1 of model 'digits' in project 'vision', aliased 'production'."""
    linear = linear_model(seed=11)
    digest = ctx.blobs.put_bytes(linear.data).digest
    register_version(ctx, project=PROJECT, model="digits", digest=digest)
    set_alias(ctx, project=PROJECT, model="digits", alias="production", version=1)
    return linear


def infer(url: str, name: str, x: np.ndarray) -> np.ndarray:
    payload = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}  # fmt: skip
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=payload, timeout=10)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_deploy_returns_at_once_and_the_reconciler_makes_it_serve(
    ctx: Context, model: LinearModel
) -> None:
    began = time.monotonic()
    created = deploy(ctx, project=PROJECT, name="web", model="digits", max_wait_ms=2)
    assert time.monotonic() - began < 1.0  # nothing was started or waited for
    assert created.status is DeploymentStatus.STARTING and created.url is None
    assert created.spec.targets == [DeploymentTarget(alias="production")]
    assert created.spec.batching.wait_ms == 2
    assert created.created_by == "tester"

    deployment = reconciler.settle(ctx, project=PROJECT, name="web", timeout=60)
    assert deployment.status is DeploymentStatus.RUNNING, deployment.message
    assert deployment.model == "digits" and deployment.version == 1
    assert deployment.alias == "production"
    assert [(t.version, t.weight, t.alias) for t in deployment.targets] == [(1, 100, "production")]
    [replica] = deployment.replicas
    assert replica.state is ReplicaState.READY and replica.restarts == 0
    assert deployment.url == replica.url and deployment.pid == replica.pid
    assert deployment.url is not None and deployment.url.startswith("http://127.0.0.1:")

    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(infer(deployment.url, "web", x), model.reference(x))
    assert get_deployment(ctx, project=PROJECT, name="web") == deployment
    assert list_deployments(ctx, project=PROJECT) == [deployment]
    # a pass over a settled deployment changes nothing
    again = reconciler.reconcile_once(ctx)
    assert not (again.started or again.failed or again.stopped or again.switched)

    with pytest.raises(ConflictError, match=r"already exists .* update") as info:
        deploy(ctx, project=PROJECT, name="web", model="digits")
    assert info.value.field == "name"

    log = ctx.settings.deployments_dir / PROJECT / "web" / f"replica-{replica.id}.log"
    assert "loaded 'web' version 1" in log.read_text()

    stopped = stop_deployment(ctx, project=PROJECT, name="web")
    assert stopped.status is DeploymentStatus.STOPPED
    assert stopped.url is None and stopped.pid is None
    assert [r.state for r in stopped.replicas] == [ReplicaState.STOPPED]
    assert not psutil.pid_exists(replica.pid or 0)
    with pytest.raises(InvalidStateError, match="already stopped"):
        stop_deployment(ctx, project=PROJECT, name="web")
    with pytest.raises(InvalidStateError, match="is stopped"):
        update_deployment(ctx, project=PROJECT, name="web", replicas=ReplicaBounds(min=2, max=2))
    assert not reconciler.reconcile_once(ctx).started  # a stopped deployment stays stopped

    with ctx.db.read() as s:
        actions = [(e.action, e.resource) for e in list_events(s, limit=1000)]
        assert ("deployment.create", f"project/{PROJECT}/deployment/web") in actions
        assert ("deployment.stop", f"project/{PROJECT}/deployment/web") in actions
        assert verify_chain(s) is None
        edges = edges_of(s, kind="deployment", id=deployment.id)
        assert [(e.source_kind, e.relation) for e in edges] == [("model_version", "serves")]

    # the name can be deployed again, by version number this time
    second = deploy(ctx, project=PROJECT, name="web", model="digits", ref="1")
    assert second.id == deployment.id and second.replicas == []
    assert second.spec.targets == [DeploymentTarget(version=1)]
    stop_deployment(ctx, project=PROJECT, name="web")


def test_a_version_that_cannot_load_fails_the_deployment_with_its_log(
    ctx: Context, model: LinearModel
) -> None:
    digest = ctx.blobs.put_bytes(linear_model(seed=12).data).digest
    assert register_version(ctx, project=PROJECT, model="digits", digest=digest).version == 2
    blob = Path(ctx.blobs.root, digest[:2], digest[2:4], digest)
    blob.write_bytes(blob.read_bytes()[:100])  # corrupt it after registration

    deploy(ctx, project=PROJECT, name="broken", model="digits", ref="2")
    failed = reconciler.settle(ctx, project=PROJECT, name="broken", timeout=60)
    assert failed.status is DeploymentStatus.FAILED, failed.message
    assert "exited" in failed.message  # with its status when this process reaped it
    assert "is corrupted" in failed.message  # the tail of the replica's log
    assert "replica-" in failed.message and ".log" in failed.message
    assert failed.rollout is not None and failed.rollout.error is not None
    assert failed.pid is None and failed.url is None
    # it is not restarted in a loop: the rollout stopped
    reconciler.reconcile_once(ctx)
    assert get_deployment(ctx, project=PROJECT, name="broken").replicas == []


@pytest.mark.parametrize(
    ("spec", "field", "match"),
    [
        (
            DeploymentSpec(targets=[DeploymentTarget(version=1, weight=60)]),
            "targets",
            r"sum to 100, and 60 = 60",
        ),
        (
            DeploymentSpec(
                targets=[
                    DeploymentTarget(version=1, weight=50),
                    DeploymentTarget(alias="production", weight=30),
                ]
            ),
            "targets",
            r"50 \+ 30 = 80",
        ),
        (
            DeploymentSpec(targets=[DeploymentTarget(version=1, alias="production")]),
            "targets[0]",
            "exactly one of version",
        ),
        (
            DeploymentSpec(targets=[DeploymentTarget(version=1, shadow=True)]),
            "targets",
            "not a shadow",
        ),
        (DeploymentSpec(replicas=ReplicaBounds(min=3, max=2)), "replicas.max", "between"),
        (DeploymentSpec(replicas=ReplicaBounds(min=0, max=2)), "replicas.min", "between"),
        (DeploymentSpec(targets=[]), "targets", "1 to 8 targets"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    ctx: Context, model: LinearModel, spec: DeploymentSpec, field: str, match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        deploy(ctx, project=PROJECT, name="web", model="digits", spec=spec)
    assert info.value.field == field
    assert list_deployments(ctx, project=PROJECT) == []


def test_unknown_names_are_refused_before_anything_is_recorded(
    ctx: Context, model: LinearModel
) -> None:
    with pytest.raises(InvalidInputError) as info:
        deploy(ctx, project=PROJECT, name="../web", model="digits")
    assert info.value.field == "name"
    with pytest.raises(InvalidInputError) as info:
        deploy(ctx, project=PROJECT, name="web", model="digits", max_batch_size=0)
    assert info.value.field == "max_batch_size"
    with pytest.raises(NotFoundError, match="no alias 'staging'") as info:
        deploy(ctx, project=PROJECT, name="web", model="digits", ref="staging")
    assert info.value.field == "targets[0]"
    canary = DeploymentSpec(
        targets=[DeploymentTarget(version=1, weight=90), DeploymentTarget(version=7, weight=10)]
    )
    with pytest.raises(NotFoundError) as info:
        deploy(ctx, project=PROJECT, name="web", model="digits", spec=canary)
    assert info.value.field == "targets[1]"
    with pytest.raises(NotFoundError):
        deploy(ctx, project=PROJECT, name="web", model="faces")
    with pytest.raises(NotFoundError, match="deployment 'web' does not exist"):
        get_deployment(ctx, project=PROJECT, name="web")
    with pytest.raises(NotFoundError):
        stop_deployment(ctx, project=PROJECT, name="web")
    assert list_deployments(ctx, project=PROJECT) == []
    with ctx.db.read() as s:
        assert not [e for e in list_events(s, limit=1000) if e.action.startswith("deployment.")]


def test_an_update_with_bad_targets_changes_nothing(ctx: Context, model: LinearModel) -> None:
    before = deploy(ctx, project=PROJECT, name="web", model="digits")
    with pytest.raises(InvalidInputError, match="sum to 100"):
        update_deployment(
            ctx, project=PROJECT, name="web", targets=[DeploymentTarget(version=1, weight=99)]
        )
    with pytest.raises(NotFoundError, match="no alias 'gone'"):
        update_deployment(
            ctx, project=PROJECT, name="web", targets=[DeploymentTarget(alias="gone")]
        )
    assert get_deployment(ctx, project=PROJECT, name="web").spec == before.spec
    stop_deployment(ctx, project=PROJECT, name="web")


def test_start_replica_directly_from_a_blob(ctx: Context) -> None:
    linear = linear_model(seed=13)
    digest = ctx.blobs.put_bytes(linear.data).digest
    pid, url = start_replica(ctx, name="raw", digest=digest, version=4, ready_timeout=60)
    try:
        assert httpx.get(f"{url}/v2/models/raw").json()["versions"] == ["4"]
        x = np.full((2, 64), 0.25, dtype=np.float32)
        np.testing.assert_array_equal(infer(url, "raw", x), linear.reference(x))
    finally:
        assert launcher.stop_process_group(pid, None)
    assert not psutil.pid_exists(pid)
    assert not launcher.stop_process_group(pid, None)  # already gone: nothing to signal


def test_start_replica_of_a_missing_blob_raises_with_the_log(ctx: Context) -> None:
    with pytest.raises(BackendError, match="is not in the store") as info:
        start_replica(ctx, name="raw", digest="cd" * 32, version=1)
    assert info.value.details["log"].endswith("raw/replica.log")
