"""Rollouts under continuous load through the gateway: not one request fails, responses move
from the old version to the new, and a version that cannot load leaves the old one serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shipyard.domain.models import DeploymentStatus, DeploymentTarget, ReplicaState
from shipyard.errors import BackendError
from shipyard.serving import reconciler
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import linear_model
from tests.serving.gateway_helpers import Load, ThreadServer
from tests.serving.test_deployments import stop_stray_replicas


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """Deployment 'api' follows 'digits@production' (v1); v2 is good, v3's blob is corrupt."""
    home = Path(tmp_path_factory.mktemp("rollout")) / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler, "DRAIN_S", 1.0)  # > the gateway's route refresh
        running = ThreadServer(home)
        ctx = running.ctx
        for seed in (31, 32, 33):
            digest = ctx.blobs.put_bytes(linear_model(seed=seed).data).digest
            register_version(ctx, project="default", model="digits", digest=digest)
        blob = Path(ctx.blobs.root, digest[:2], digest[2:4], digest)
        blob.write_bytes(blob.read_bytes()[:100])  # v3: corrupted after registration
        set_alias(ctx, project="default", model="digits", alias="production", version=1)
        with running.client() as client:
            deployed = client.deployments.create("api", model="digits", timeout=90)
        assert deployed.status is DeploymentStatus.RUNNING, deployed.message
        yield running
        with running.client() as client:
            client.deployments.stop("api")
        running.stop()
    stop_stray_replicas()


def test_moving_the_alias_rolls_out_without_a_failed_request(server: ThreadServer) -> None:
    with server.client() as client:
        old = client.deployments.get("api").replicas
        assert [r.version for r in old] == [1]
        with Load(f"{server.url}/v2/models/api/infer", server.reader_token) as load:
            load.wait_for_more(30)
            client.models.set_alias("digits", "production", 2)  # the reconciler notices

            def rolled_out() -> bool:
                current = client.deployments.get("api")
                return [t.version for t in current.targets] == [2] and current.settled()

            wait_for(rolled_out, timeout=90, what="the rollout to version 2")
            load.wait_for_more(30)
        assert load.failures == [], load.failures[:5]
        assert load.timeline[0] == "1" and load.ok["1"] >= 30
        first_new = load.timeline.index("2")
        # once the new version serves, the old one gets at most what was already under way
        assert load.timeline[first_new:].count("1") <= load.threads
        assert set(load.timeline[-30:]) == {"2"}
        current = client.deployments.get("api")
    assert current.status is DeploymentStatus.RUNNING and current.version == 2
    assert [(r.version, r.state) for r in current.replicas] == [(2, ReplicaState.READY)]
    assert not psutil.pid_exists(old[0].pid or 0)  # drained, then stopped


def test_a_target_that_fails_to_load_stops_the_rollout_and_the_old_version_serves_on(
    server: ThreadServer,
) -> None:
    with server.client() as client:
        serving = client.deployments.get("api")
        # v2 after the first test on this worker, v1 when xdist ran this one elsewhere
        good = [t.version for t in serving.targets]
        assert good in ([1], [2]), good
        with Load(f"{server.url}/v2/models/api/infer", server.reader_token) as load:
            load.wait_for_more(20)
            with pytest.raises(BackendError, match=r"(?s)failed: .*is corrupted"):
                client.deployments.update("api", targets=[DeploymentTarget(version=3)])
            load.wait_for_more(20)
        assert load.failures == [], load.failures[:5]
        assert set(load.ok) == {str(good[0])}
        after = client.deployments.get("api")
    assert after.status is DeploymentStatus.RUNNING
    assert [t.version for t in after.targets] == good
    assert after.rollout is not None and "is corrupted" in (after.rollout.error or "")
    assert [t.version for t in after.rollout.to] == [3]
    assert "the rollout to version 3 failed" in after.message
    assert after.spec.targets == [DeploymentTarget(version=3)]  # the wish stays on record
    assert [(r.version, r.state) for r in after.replicas] == [(good[0], ReplicaState.READY)]
    assert after.replicas[0].pid == serving.replicas[0].pid  # untouched
