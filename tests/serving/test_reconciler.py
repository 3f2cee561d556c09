"""The reconciler: its pure plan, and real replicas that die, restart and scale."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from shipyard.context import Context, open_context
from shipyard.domain.models import (
    DeploymentSpec,
    DeploymentStatus,
    ReplicaBounds,
    ReplicaState,
    ServingTarget,
)
from shipyard.serving import launcher, reconciler
from shipyard.serving.deployments import deploy, get_deployment, scale_deployment, stop_deployment
from shipyard.serving.reconciler import ReplicaView, backoff_s, plan
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import linear_model
from tests.serving.test_deployments import stop_stray_replicas

NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
V1 = ServingTarget(version=1, weight=100)
V2 = ServingTarget(version=2, weight=100)


def view(
    rid: str,
    version: int,
    state: ReplicaState,
    *,
    ever_ready: bool = True,
    restart_at: datetime | None = None,
    message: str = "",
) -> ReplicaView:
    return ReplicaView(rid, version, state, 0, ever_ready, restart_at, message)


def spec(count: int = 1) -> DeploymentSpec:
    return DeploymentSpec(replicas=ReplicaBounds(min=count, max=max(count, 1)))


# --- the plan, without processes ----------------------------------------------------------------


def test_a_new_deployment_starts_its_replicas_and_runs_once_they_are_ready() -> None:
    first = plan(spec=spec(2), desired=[V1], desired_error=None, serving=[], rollout=None,
                 replicas=[], now=NOW)  # fmt: skip
    assert first.start == {1: 2} and first.status is DeploymentStatus.STARTING
    ready = [view("a", 1, ReplicaState.READY), view("b", 1, ReplicaState.READY)]
    second = plan(spec=spec(2), desired=[V1], desired_error=None, serving=[],
                  rollout=first.rollout, replicas=ready, now=NOW)  # fmt: skip
    assert second.serving == [V1] and second.rollout is None and not second.start
    assert second.status is DeploymentStatus.RUNNING
    assert "serving version 1 (2/2 replicas ready)" in second.message


def test_a_failed_replica_is_restarted_only_when_its_backoff_is_over() -> None:
    later = NOW + timedelta(seconds=4)
    failed = [view("a", 1, ReplicaState.FAILED, restart_at=later, message="exited")]
    waiting = plan(spec=spec(), desired=[V1], desired_error=None, serving=[V1], rollout=None,
                   replicas=failed, now=NOW)  # fmt: skip
    assert waiting.restart == [] and waiting.start == {}  # the slot counts: none is added
    assert waiting.status is DeploymentStatus.FAILED and "exited" in waiting.message
    due = plan(spec=spec(), desired=[V1], desired_error=None, serving=[V1], rollout=None,
               replicas=failed, now=later)  # fmt: skip
    assert due.restart == ["a"]
    assert [backoff_s(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_scaling_down_drains_ready_replicas_and_stops_others() -> None:
    replicas = [view("a", 1, ReplicaState.READY), view("b", 1, ReplicaState.READY),
                view("c", 1, ReplicaState.STARTING)]  # fmt: skip
    out = plan(spec=spec(1), desired=[V1], desired_error=None, serving=[V1], rollout=None,
               replicas=replicas, now=NOW)  # fmt: skip
    assert out.stop == ["c"] and len(out.drain) == 1 and not out.start


def test_a_rollout_moves_traffic_only_when_the_new_version_is_ready() -> None:
    old = view("old", 1, ReplicaState.READY)
    starting = plan(spec=spec(), desired=[V2], desired_error=None, serving=[V1], rollout=None,
                    replicas=[old], now=NOW)  # fmt: skip
    assert starting.start == {2: 1} and starting.serving == [V1] and not starting.drain
    assert starting.rollout is not None and starting.rollout["error"] is None
    assert starting.status is DeploymentStatus.RUNNING and "rolling out" in starting.message
    new = view("new", 2, ReplicaState.READY)
    switched = plan(spec=spec(), desired=[V2], desired_error=None, serving=[V1],
                    rollout=starting.rollout, replicas=[old, new], now=NOW)  # fmt: skip
    assert switched.serving == [V2] and switched.rollout is None
    assert switched.drain == ["old"] and not switched.start


def test_a_version_that_fails_to_load_stops_the_rollout_and_the_old_one_keeps_serving() -> None:
    old = view("old", 1, ReplicaState.READY)
    broken = view("new", 2, ReplicaState.FAILED, ever_ready=False, message="is corrupted")
    out = plan(spec=spec(), desired=[V2], desired_error=None, serving=[V1], rollout=None,
               replicas=[old, broken], now=NOW)  # fmt: skip
    assert out.serving == [V1] and out.stop == ["new"] and not out.restart
    assert out.rollout is not None and out.rollout["error"] == "is corrupted"
    assert out.status is DeploymentStatus.RUNNING
    assert "the rollout to version 2 failed: is corrupted" in out.message
    again = plan(spec=spec(), desired=[V2], desired_error=None, serving=[V1],
                 rollout=out.rollout, replicas=[old], now=NOW)  # fmt: skip
    assert not again.start and again.rollout == out.rollout  # not retried in a loop


def test_a_target_that_cannot_be_resolved_keeps_what_serves() -> None:
    old = view("old", 1, ReplicaState.READY)
    out = plan(spec=spec(), desired=None, desired_error="no alias 'production'", serving=[V1],
               rollout=None, replicas=[old], now=NOW)  # fmt: skip
    assert out.serving == [V1] and not (out.stop or out.drain or out.start)
    assert "cannot be resolved now: no alias 'production'" in out.message


# --- real replicas ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    """Deployment 'web' of 'digits' v1 in project 'p', settled with one ready replica."""
    home = Path(tmp_path_factory.mktemp("reconciler")) / "home"
    settings = Settings(home=home)
    ctx = open_context(settings, actor="tester")
    digest = ctx.blobs.put_bytes(linear_model(seed=3).data).digest
    register_version(ctx, project="p", model="digits", digest=digest)
    set_alias(ctx, project="p", model="digits", alias="production", version=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler, "RESTART_BACKOFF_S", 0.2)
        patch.setattr(reconciler, "DRAIN_S", 0.3)
        deploy(ctx, project="p", name="web", model="digits")
        ready = reconciler.settle(ctx, project="p", name="web", timeout=60)
        assert ready.status is DeploymentStatus.RUNNING, ready.message
        yield ctx
        stop_deployment(ctx, project="p", name="web")
    stop_stray_replicas()
    forget_database(settings.database_url)


def test_a_replica_that_dies_is_marked_failed_and_restarted_with_backoff(
    served: Context,
) -> None:
    [replica] = get_deployment(served, project="p", name="web").replicas
    assert replica.pid is not None
    os.killpg(replica.pid, signal.SIGKILL)
    wait_for(lambda: launcher.exit_code(replica.pid or 0) is not None, what="the kill")

    result = reconciler.reconcile_once(served, project="p", name="web")
    assert result.failed == [replica.id]
    failed = get_deployment(served, project="p", name="web")
    [slot] = failed.replicas
    assert slot.state is ReplicaState.FAILED and slot.next_restart_at is not None
    assert "exited (killed by signal 9)" in slot.message and "restart 1 in" in slot.message
    assert failed.status is DeploymentStatus.FAILED and failed.url is None

    back = reconciler.settle(served, project="p", name="web", timeout=60)
    assert back.status is DeploymentStatus.RUNNING, back.message
    [slot] = back.replicas
    assert slot.id == replica.id and slot.restarts == 1  # the same slot, restarted
    assert slot.state is ReplicaState.READY and slot.pid != replica.pid


def test_scale_up_then_down_drains_the_extra_replica(served: Context) -> None:
    before = get_deployment(served, project="p", name="web").replicas
    scale_deployment(served, project="p", name="web", min_replicas=2)
    two = reconciler.settle(served, project="p", name="web", timeout=60)
    assert [r.state for r in two.replicas] == [ReplicaState.READY] * 2, two.message
    assert two.spec.replicas == ReplicaBounds(min=2, max=2)

    scale_deployment(served, project="p", name="web", min_replicas=1, max_replicas=2)
    reconciler.reconcile_once(served, project="p", name="web")
    states = sorted(r.state.value for r in get_deployment(served, project="p", name="web").replicas)
    assert states == ["draining", "ready"]
    one = reconciler.settle(served, project="p", name="web", timeout=30)
    assert [r.state for r in one.replicas] == [ReplicaState.READY]
    gone = {r.pid for r in two.replicas} - {r.pid for r in one.replicas}
    assert len(gone) == 1 and not psutil.pid_exists(gone.pop() or 0)
    assert {r.id for r in before} & {r.id for r in two.replicas}  # the first slot stayed
