"""Autoscaling: the pure plan (up fast, down slow, clamps, zero), bad specs, and real replicas
driven up by concurrent slow requests, back down after the delay, and to zero and back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from shipyard.context import Context
from shipyard.domain.models import (
    AutoscalingSpec,
    BatchingSpec,
    DeploymentSpec,
    DeploymentStatus,
    ReplicaBounds,
    ReplicaState,
    ServingTarget,
)
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security.audit import list_events
from shipyard.server.app import create_app
from shipyard.serving import reconciler
from shipyard.serving.deployments import (
    deploy,
    get_deployment,
    scale_deployment,
    stop_deployment,
    update_deployment,
)
from shipyard.serving.reconciler import Load, ReplicaView, plan
from shipyard.settings import Settings
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import _model, linear_model
from tests.server.conftest import TestClient
from tests.serving.gateway_helpers import ThreadServer, request_body
from tests.serving.test_deployments import stop_stray_replicas

NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
V1 = ServingTarget(version=1, weight=100)
V2 = ServingTarget(version=2, weight=100)
PROJECT = "auto"


def view(rid: str, state: ReplicaState = ReplicaState.READY, version: int = 1) -> ReplicaView:
    return ReplicaView(rid, version, state, 0, True, None, "")


def auto(
    lo: int = 1, hi: int = 4, *, target: float = 2.0, up: float = 0.0, down: float = 10.0
) -> DeploymentSpec:
    return DeploymentSpec(
        replicas=ReplicaBounds(min=lo, max=hi),
        autoscaling=AutoscalingSpec(
            target_in_flight=target, scale_up_window_s=up, scale_down_delay_s=down
        ),
    )


def decide(
    spec: DeploymentSpec,
    replicas: list[ReplicaView],
    load: Load,
    *,
    now: datetime = NOW,
    serving: list[ServingTarget] | None = None,
    desired: list[ServingTarget] | None = None,
) -> reconciler.Plan:
    return plan(
        spec=spec,
        desired=desired or [V1],
        desired_error=None,
        serving=[V1] if serving is None else serving,
        rollout=None,
        replicas=replicas,
        now=now,
        load=load,
    )


# --- the plan, without processes ----------------------------------------------------------------


def test_load_above_the_target_scales_up_at_once_and_is_clamped_to_max() -> None:
    out = decide(auto(), [view("a")], Load(in_flight={1: 7.0}))
    assert out.counts == {1: 4} and out.start == {1: 4} and not out.drain
    assert out.scaled == [{"version": 1, "from": 1, "to": 4, "in_flight": 7.0}]
    assert "scaled version 1 up from 1 to 4 replicas" in out.message
    assert "autoscaling 1-4 replicas per target at 2 requests in flight each" in out.message
    flood = decide(auto(), [view("a")], Load(in_flight={1: 1000.0}))
    assert flood.counts == {1: 4}  # max
    exact = decide(auto(), [view("a")], Load(in_flight={1: 4.0}))
    assert exact.counts == {1: 2}  # ceil(4 / 2), not 3


def test_a_scale_up_window_waits_for_the_load_to_stay_high() -> None:
    spec = auto(up=5)
    first = decide(spec, [view("a")], Load(in_flight={1: 6.0}))
    assert first.counts == {1: 1} and not first.start and first.pending == {1: (1, NOW)}
    later = NOW + timedelta(seconds=5)
    second = decide(spec, [view("a")], Load(in_flight={1: 6.0}, pending=first.pending), now=later)
    assert second.counts == {1: 3} and second.start == {1: 3} and not second.pending


def test_load_below_scales_down_only_after_the_delay_and_drains_the_extra() -> None:
    spec = auto(down=10)
    three = [view("a"), view("b"), view("c")]
    first = decide(spec, three, Load(in_flight={1: 1.0}))
    assert first.counts == {1: 3} and not (first.drain or first.stop)
    assert (
        first.pending == {1: (-1, NOW)} and "scales down if its load stays below" in first.message
    )
    almost = decide(spec, three, Load(in_flight={1: 0.0}, pending=first.pending),
                    now=NOW + timedelta(seconds=9.9))  # fmt: skip
    assert almost.counts == {1: 3} and not almost.drain and almost.pending == first.pending
    done = decide(spec, three, Load(in_flight={1: 0.0}, pending=almost.pending),
                  now=NOW + timedelta(seconds=10))  # fmt: skip
    assert done.counts == {1: 1} and len(done.drain) == 2 and not done.stop
    assert done.scaled[0]["from"] == 3 and done.scaled[0]["to"] == 1 and not done.pending


def test_load_that_comes_back_resets_the_scale_down_timer() -> None:
    spec = auto(down=10)
    three = [view("a"), view("b"), view("c")]
    low = decide(spec, three, Load(in_flight={1: 0.0}))
    back = decide(spec, three, Load(in_flight={1: 6.0}, pending=low.pending),
                  now=NOW + timedelta(seconds=5))  # fmt: skip
    assert back.counts == {1: 3} and not back.pending
    low_again = decide(spec, three, Load(in_flight={1: 0.0}, pending=back.pending),
                       now=NOW + timedelta(seconds=11))  # fmt: skip
    assert low_again.counts == {1: 3} and not low_again.drain  # the timer started over


def test_counts_hold_while_a_replica_starts_or_a_ready_one_is_not_measured() -> None:
    spec = auto(down=0)
    starting = [view("a"), view("b", ReplicaState.STARTING)]
    out = decide(spec, starting, Load(in_flight={1: 0.0}))
    assert out.counts == {1: 2} and not (out.drain or out.stop)
    blind = decide(
        spec, [view("a"), view("b")], Load(in_flight={1: 0.0}, unmeasured=frozenset({1}))
    )
    assert blind.counts == {1: 2} and not blind.drain


def test_min_and_max_clamp_what_runs_now() -> None:
    spec = auto(lo=2, hi=3, down=100)
    five = [view(str(i)) for i in range(5)]
    out = decide(spec, five, Load(in_flight={1: 100.0}))
    assert out.counts == {1: 3} and len(out.drain) == 2  # above max: at once, not after a delay
    none = decide(spec, [], Load())
    assert none.counts == {1: 2} and none.start == {1: 2}


def test_without_autoscaling_the_load_is_ignored() -> None:
    fixed = DeploymentSpec(replicas=ReplicaBounds(min=1, max=4))
    out = decide(fixed, [view("a")], Load(in_flight={1: 100.0}))
    assert out.counts == {1: 1} and not out.start and not out.scaled


def test_an_idle_target_scales_to_zero_and_a_wake_starts_one_at_once() -> None:
    spec = auto(lo=0, hi=2, down=5)
    one = [view("a")]
    low = decide(spec, one, Load(in_flight={1: 0.0}))
    assert low.counts == {1: 1} and low.pending == {1: (-1, NOW)}
    zero = decide(spec, one, Load(in_flight={1: 0.0}, pending=low.pending),
                  now=NOW + timedelta(seconds=5))  # fmt: skip
    assert zero.counts == {1: 0} and zero.drain == ["a"]
    idle = decide(spec, [], Load(), now=NOW + timedelta(seconds=9))
    assert idle.counts == {1: 0} and not idle.start and idle.serving == [V1]
    assert idle.status is DeploymentStatus.RUNNING and "idle (scaled to zero)" in idle.message
    woken = decide(spec, [], Load(woken_at=NOW), now=NOW + timedelta(seconds=1))
    assert woken.start == {1: 1} and woken.status is DeploymentStatus.RUNNING
    assert "waking from zero" in woken.message
    starting = decide(spec, [view("n", ReplicaState.STARTING)], Load(woken_at=NOW),
                      now=NOW + timedelta(seconds=60))  # fmt: skip
    assert starting.counts == {1: 1} and not starting.stop  # not stopped before it served


def test_a_new_version_rolls_in_at_the_count_the_old_one_runs() -> None:
    old = [view("a"), view("b"), view("c")]
    out = decide(auto(down=10), old, Load(in_flight={1: 5.0}), desired=[V2])
    assert out.start == {2: 3} and out.serving == [V1]


# --- bad specs ----------------------------------------------------------------------------------


@pytest.fixture
def registered(ctx: Context) -> Context:
    digest = ctx.blobs.put_bytes(linear_model(seed=5).data).digest
    register_version(ctx, project=PROJECT, model="digits", digest=digest)
    set_alias(ctx, project=PROJECT, model="digits", alias="production", version=1)
    return ctx


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            DeploymentSpec(replicas=ReplicaBounds(min=0, max=1)),
            "replicas.min",
            "autoscaling policy",
        ),
        (auto(lo=0, hi=0), "replicas.max", "between 1"),
        (auto(lo=2, hi=1), "replicas.max", "between 2"),
        (auto(target=0), "autoscaling.target_in_flight", "between 0.1 and 10000"),
        (auto(target=-3), "autoscaling.target_in_flight", "requests in flight per replica"),
        (auto(target=float("nan")), "autoscaling.target_in_flight", "between"),
        (auto(down=-1), "autoscaling.scale_down_delay_s", "between 0 and 3600"),
        (auto(up=601), "autoscaling.scale_up_window_s", "between 0 and 600"),
    ],
)
def test_a_bad_autoscaling_spec_is_refused_naming_the_field(
    registered: Context, spec: DeploymentSpec, field: str, words: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        deploy(registered, project=PROJECT, name="bad", model="digits", spec=spec)
    assert caught.value.field == field and words in caught.value.message
    with pytest.raises(NotFoundError):
        get_deployment(registered, project=PROJECT, name="bad")  # nothing stored


def test_bad_updates_change_nothing_stored(registered: Context) -> None:
    deploy(registered, project=PROJECT, name="web", model="digits")
    try:
        before = get_deployment(registered, project=PROJECT, name="web").spec
        with pytest.raises(InvalidInputError) as zero:
            scale_deployment(registered, project=PROJECT, name="web", min_replicas=0)
        assert zero.value.field == "replicas.min"
        bad = AutoscalingSpec(target_in_flight=0)
        with pytest.raises(InvalidInputError) as target:
            update_deployment(registered, project=PROJECT, name="web", autoscaling=bad)
        assert target.value.field == "autoscaling.target_in_flight"
        assert get_deployment(registered, project=PROJECT, name="web").spec == before

        on = update_deployment(
            registered, project=PROJECT, name="web", autoscaling=AutoscalingSpec()
        )
        assert on.spec.autoscaling == AutoscalingSpec(target_in_flight=8, scale_down_delay_s=60)
        scaled = scale_deployment(registered, project=PROJECT, name="web", min_replicas=0)
        assert scaled.spec.replicas == ReplicaBounds(min=0, max=1)
        with pytest.raises(InvalidInputError) as off:  # min 0 needs autoscaling
            update_deployment(registered, project=PROJECT, name="web", autoscaling=None)
        assert off.value.field == "replicas.min"
        assert get_deployment(registered, project=PROJECT, name="web").spec == scaled.spec
    finally:
        stop_deployment(registered, project=PROJECT, name="web")


def test_http_sets_changes_and_refuses_autoscaling(registered: Context, settings: Settings) -> None:
    """PATCH ``autoscaling``: absent leaves it, a policy sets it, null turns it off."""
    deploy(registered, project=PROJECT, name="web", model="digits")
    url = f"/api/v1/projects/{PROJECT}/deployments/web"
    with TestClient(create_app(settings, auth=False, scheduler=False)) as client:
        try:
            on = client.patch(url, json={"autoscaling": {"target_in_flight": 4}})
            assert on.status_code == 200, on.text
            assert on.json()["spec"]["autoscaling"]["target_in_flight"] == 4
            kept = client.patch(url, json={"batching": {"max_batch": 8, "wait_ms": 1}})
            assert kept.json()["spec"]["autoscaling"]["target_in_flight"] == 4
            bad = client.patch(url, json={"autoscaling": {"target_in_flight": 0}})
            assert bad.status_code == 422 and bad.json()["field"] == "autoscaling.target_in_flight"
            zero = client.post(f"{url}/scale", json={"min": 0})
            assert zero.status_code == 200, zero.text
            assert zero.json()["spec"]["replicas"] == {"min": 0, "max": 1}
            off = client.patch(url, json={"autoscaling": None})
            assert off.status_code == 422 and off.json()["field"] == "replicas.min"
            assert client.post(f"{url}/scale", json={"min": 1}).status_code == 200
            plain = client.patch(url, json={"autoscaling": None})
            assert plain.status_code == 200 and plain.json()["spec"]["autoscaling"] is None
        finally:
            stop_deployment(registered, project=PROJECT, name="web")


def test_the_openapi_schema_documents_the_bounds() -> None:
    schema = AutoscalingSpec.model_json_schema()["properties"]
    assert schema["target_in_flight"]["minimum"] == 0.1
    assert schema["scale_down_delay_s"]["maximum"] == 3600
    assert ReplicaBounds.model_json_schema()["properties"]["min"]["minimum"] == 0


# --- real replicas ------------------------------------------------------------------------------


def slow_model(width: int = 512) -> bytes:
    """y: FP32 [batch, 10] from x: FP32 [batch, 64], about 8 ms of one core per row (each row
    becomes a [width, width] matrix multiplied by another): requests stay in flight."""
    rng = np.random.default_rng(0)
    arrays = {
        "W1": rng.standard_normal((64, width)),
        "C": rng.standard_normal((width, width)),
        "D": rng.standard_normal((width, width)) / width,
        "W2": rng.standard_normal((width, 10)),
        "axes": np.array([2], dtype=np.int64),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Unsqueeze", ["h", "axes"], ["hc"]),  # [b, width, 1]
            helper.make_node("Add", ["hc", "C"], ["m"]),  # [b, width, width]
            helper.make_node("MatMul", ["m", "D"], ["p"]),
            helper.make_node("ReduceMean", ["p"], ["r"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), k)
            for k, a in arrays.items()
        ],
    )
    return _model(graph)


@dataclass
class DirectLoad:
    """Threads that keep one request each in flight, round robin over ``urls`` (updated by the
    test as replicas come and go)."""

    name: str
    threads: int
    urls: list[str] = field(default_factory=list)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> DirectLoad:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self, index: int) -> None:
        x = np.full((1, 64), 0.25, dtype=np.float32)
        body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        n = index
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                urls = self.urls
                if not urls:
                    time.sleep(0.01)
                    continue
                n += 1
                url = urls[n % len(urls)]
                try:
                    r = client.post(f"{url}/v2/models/{self.name}/infer", json=body)
                    failure = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    failure = f"{url}: {type(exc).__name__} {exc}"
                with self._lock:
                    if failure is None:
                        self.ok += 1
                    else:
                        self.failures.append(failure)


@pytest.fixture
def slow(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    monkeypatch.setattr(reconciler, "DRAIN_S", 0.3)
    digest = ctx.blobs.put_bytes(slow_model()).digest
    register_version(ctx, project=PROJECT, model="slow", digest=digest)
    set_alias(ctx, project=PROJECT, model="slow", alias="production", version=1)
    yield ctx
    stop_stray_replicas()


def ready_urls(ctx: Context, name: str) -> list[str]:
    dep = get_deployment(ctx, project=PROJECT, name=name)
    return [r.url for r in dep.replicas if r.state is ReplicaState.READY and r.url]


def states(ctx: Context, name: str) -> list[str]:
    return sorted(r.state.value for r in get_deployment(ctx, project=PROJECT, name=name).replicas)


def pass_until(
    ctx: Context, name: str, done: Callable[[], object], *, timeout: float, what: str
) -> None:
    """Run reconcile passes (as a server's loop does) until ``done()`` holds."""

    def step() -> bool:
        reconciler.reconcile_once(ctx, project=PROJECT, name=name)
        return bool(done())

    wait_for(step, timeout=timeout, interval=0.1, what=what)


def test_concurrent_load_scales_up_and_back_down_after_the_delay(slow: Context) -> None:
    delay = 2.0
    spec = DeploymentSpec(
        replicas=ReplicaBounds(min=1, max=3),
        batching=BatchingSpec(max_batch=32, wait_ms=0),
        autoscaling=AutoscalingSpec(target_in_flight=1, scale_down_delay_s=delay),
    )
    deploy(slow, project=PROJECT, name="busy", model="slow", spec=spec)
    pass_until(slow, "busy", lambda: states(slow, "busy") == ["ready"], timeout=60,
               what="one ready replica")  # fmt: skip
    one = get_deployment(slow, project=PROJECT, name="busy")
    assert one.status is DeploymentStatus.RUNNING, one.message

    with DirectLoad(name="busy", threads=6) as load:
        load.urls = ready_urls(slow, "busy")

        def three_ready() -> bool:
            load.urls = ready_urls(slow, "busy")
            return len(load.urls) == 3

        pass_until(slow, "busy", three_ready, timeout=90, what="3 ready replicas under load")
        load.urls = ready_urls(slow, "busy")
        time.sleep(0.5)  # some requests on each replica (not a wait for a condition)
    assert load.ok > 0 and not load.failures, load.failures[:3]
    up = get_deployment(slow, project=PROJECT, name="busy")
    assert "scaled version 1 up from" in up.message, up.message
    stopped_at = time.monotonic()

    first_drain: list[float] = []

    def back_to_one() -> bool:
        now_states = states(slow, "busy")
        if "draining" in now_states and not first_drain:
            first_drain.append(time.monotonic())
        return now_states == ["ready"]

    pass_until(slow, "busy", back_to_one, timeout=60, what="back to one replica")
    # not while the load ran; the delay itself is timed exactly by the plan() tests above (here
    # a probe that caught a replica between two requests may have started it a moment early)
    assert first_drain and first_drain[0] > stopped_at
    down = get_deployment(slow, project=PROJECT, name="busy")
    assert "scaled version 1 down from 3 to 1" in down.message, down.message
    gone = {r.pid for r in up.replicas} - {r.pid for r in down.replicas}
    assert len(gone) == 2 and not any(psutil.pid_exists(pid or 0) for pid in gone)
    with slow.db.read() as s:
        steps = [
            e.details for e in list_events(s, limit=1000) if e.action == "deployment.autoscale"
        ]
    assert steps[-1]["from"] == 3 and steps[-1]["to"] == 1
    assert max(step["to"] for step in steps) == 3
    stop_deployment(slow, project=PROJECT, name="busy")


def test_an_idle_deployment_scales_to_zero_and_a_wake_brings_a_replica_back(
    slow: Context,
) -> None:
    spec = DeploymentSpec(
        replicas=ReplicaBounds(min=0, max=2),
        autoscaling=AutoscalingSpec(target_in_flight=1, scale_down_delay_s=1.0),
    )
    deploy(slow, project=PROJECT, name="lazy", model="slow", spec=spec)
    pass_until(slow, "lazy", lambda: states(slow, "lazy") == ["ready"], timeout=60,
               what="the replica a new deployment starts")  # fmt: skip
    [first] = get_deployment(slow, project=PROJECT, name="lazy").replicas
    pass_until(slow, "lazy", lambda: states(slow, "lazy") == [], timeout=30,
               what="scaled to zero")  # fmt: skip
    idle = get_deployment(slow, project=PROJECT, name="lazy")
    assert idle.status is DeploymentStatus.RUNNING and "idle (scaled to zero)" in idle.message
    assert idle.settled() and not psutil.pid_exists(first.pid or 0)
    again = reconciler.reconcile_once(slow, project=PROJECT, name="lazy")
    assert not again.started  # idle stays idle

    reconciler.wake(slow, project=PROJECT, name="lazy")
    woken = reconciler.reconcile_once(slow, project=PROJECT, name="lazy")
    assert len(woken.started) == 1  # at once, in the next pass
    waking = get_deployment(slow, project=PROJECT, name="lazy")
    assert waking.status is DeploymentStatus.RUNNING and "waking from zero" in waking.message
    pass_until(slow, "lazy", lambda: ready_urls(slow, "lazy"), timeout=60, what="a woken replica")
    [url] = ready_urls(slow, "lazy")
    x = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    answer = httpx.post(f"{url}/v2/models/lazy/infer", json=x, timeout=30)
    assert answer.status_code == 200, answer.text
    pass_until(slow, "lazy", lambda: states(slow, "lazy") == [], timeout=30,
               what="scaled to zero again")  # fmt: skip
    stop_deployment(slow, project=PROJECT, name="lazy")


def test_a_burst_to_a_deployment_scaled_to_zero_is_held_until_a_replica_serves_it(
    tmp_path: Path,
) -> None:
    """Through the server's front door (its reconciler loop running): every request of a burst
    to an idle deployment waits for the replica the first one wakes, and none fails."""
    server = ThreadServer(tmp_path / "home")
    try:
        ctx = server.ctx
        digest = ctx.blobs.put_bytes(linear_model(64, 10, input_name="x").data).digest
        register_version(ctx, project="default", model="tiny", digest=digest)
        set_alias(ctx, project="default", model="tiny", alias="production", version=1)
        spec = DeploymentSpec(
            replicas=ReplicaBounds(min=0, max=1),
            autoscaling=AutoscalingSpec(target_in_flight=4, scale_down_delay_s=1.0),
        )
        deploy(ctx, project="default", name="zero", model="tiny", spec=spec)

        def idle() -> bool:
            current = get_deployment(ctx, project="default", name="zero")
            return current.replicas == [] and "idle (scaled to zero)" in current.message

        wait_for(idle, timeout=90, interval=0.2, what="the deployment to scale to zero")
        body = request_body(np.full((1, 64), 0.5, dtype=np.float32))
        url = f"{server.url}/v2/models/zero/infer"
        headers = {"Authorization": f"Bearer {server.reader_token}"}
        answers: list[httpx.Response | BaseException] = []
        lock = threading.Lock()

        def one() -> None:
            try:
                answer: httpx.Response | BaseException = httpx.post(
                    url, json=body, headers=headers, timeout=60
                )
            except httpx.HTTPError as exc:
                answer = exc
            with lock:
                answers.append(answer)

        burst = [threading.Thread(target=one) for _ in range(12)]
        started = time.monotonic()
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(90)
        held_s = time.monotonic() - started
        failed = [a for a in answers if not isinstance(a, httpx.Response) or a.status_code != 200]
        assert len(answers) == 12 and failed == [], [
            a if isinstance(a, BaseException) else (a.status_code, a.text) for a in failed
        ]
        assert {a.headers["x-shipyard-model-version"] for a in answers} == {"1"}  # type: ignore[union-attr]
        assert held_s > 0.2  # they waited for a replica process to start and load the model
        woken = get_deployment(ctx, project="default", name="zero")
        assert [r.state for r in woken.replicas] == [ReplicaState.READY]
        # a stopped deployment is not woken: refused (once the gateway's cached routes, kept
        # for a moment, have seen the stop) rather than held for WAKE_TIMEOUT_S
        stop_deployment(ctx, project="default", name="zero")
        quick = time.monotonic()

        def refused() -> httpx.Response | None:
            answer = httpx.post(url, json=body, headers=headers, timeout=60)
            return answer if answer.status_code in (404, 503) else None

        answer = wait_for(refused, timeout=10, interval=0.2, what="the stop to be seen")
        assert "no ready replica" in answer.json()["message"], answer.text
        assert time.monotonic() - quick < 10
    finally:
        server.stop()
        stop_stray_replicas()
