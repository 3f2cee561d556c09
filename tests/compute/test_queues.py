"""Queues: quotas stored and checked, usage / borrowed / waiting computed from the job rows,
submit-time checks, and a quota shrunk below use (running jobs keep running, new ones wait)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shipyard.compute import admission, jobs, queues
from shipyard.compute.policy import POLICIES, get_policy
from shipyard.compute.policy.base import (
    Demand,
    Gpu,
    Node,
    PendingJob,
    Placement,
    Quota,
    RunningJob,
    Snapshot,
    WorkerPlacement,
)
from shipyard.context import Context, new_id, open_context
from shipyard.domain.models import JobSpec, JobStatus, QuotaSpec, Resources
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from shipyard.security import audit
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.queries import project_id
from shipyard.store.tables import JobRow, QueueRow, utcnow
from tests.conftest import wait_for


def add_job(
    ctx: Context,
    *,
    project: str,
    status: JobStatus = JobStatus.RUNNING,
    queue: str | None = None,
    gpus: int = 0,
    cpus: float = 1.0,
    memory_mb: int = 512,
    workers: int = 1,
    priority: int = 0,
    message: str = "",
    age_s: float = 0.0,
    gpu_type: str | None = None,
    placement: list[dict[str, Any]] | None = None,
) -> str:
    """A job row as the pipeline leaves it (RUNNING with a placement, or QUEUED with a reason)."""
    job_id = new_id()
    spec = JobSpec(
        command=["true"],
        resources=Resources(cpus=cpus, memory_mb=memory_mb, gpus=gpus, gpu_type=gpu_type),
        workers=workers,
        queue=queue,
        priority=priority,
    )
    with ctx.db.transaction() as s:
        s.add(
            JobRow(
                id=job_id,
                project_id=project_id(s, project, create=True),
                name="j",
                spec=spec.model_dump(mode="json"),
                status=status.value,
                priority=priority,
                cpus=cpus,
                memory_mb=memory_mb,
                gpus=gpus,
                assigned_gpus=[],
                message=message,
                usage={},
                created_at=utcnow() - timedelta(seconds=age_s),
                started_at=utcnow() if status is JobStatus.RUNNING else None,
                created_by="tester",
                queue=queue or project,
                workers=workers,
                gpu_units=float(workers * gpus),
                placement=placement or [],
            )
        )
    return job_id


def viewer(ctx: Context, **roles: Role) -> Context:
    return ctx.as_principal(
        Principal(id="alice", name="alice", kind=PrincipalKind.USER, roles=roles)
    )


def stored(ctx: Context) -> list[tuple[str, dict[str, Any], float]]:
    with ctx.db.read() as s:
        rows = s.scalars(select(QueueRow).order_by(QueueRow.name))
        return [(r.name, dict(r.nominal), r.weight) for r in rows]


def test_a_queue_is_stored_audited_and_loaded_for_admission(ctx: Context) -> None:
    view = queues.set_queue(
        ctx,
        name="vision",
        nominal=Quota(gpus=8, cpus=64, memory_mb=256_000, gpus_by_model={"A100": 4}),
        cohort="lab",
        borrowing_limit=Quota(gpus=4),
        weight=2.0,
    )

    assert view.configured and view.cohort == "lab" and view.weight == 2.0
    assert view.nominal == QuotaSpec(gpus=8, cpus=64, memory_mb=256_000, gpus_by_model={"A100": 4})
    assert view.borrowing_limit == QuotaSpec(gpus=4)
    with ctx.db.read() as s:
        configs = queues.load_configs(s)
    assert set(configs) == {"vision"}
    config = configs["vision"]
    assert config.nominal == Quota(
        gpus=8.0, cpus=64.0, memory_mb=256_000, gpus_by_model={"A100": 4}
    )
    assert config.borrowing_limit == Quota(gpus=4.0)  # cpus, memory: unlimited
    assert (config.cohort, config.weight) == ("lab", 2.0)
    event = audit.list_audit_events(ctx)[-1]
    assert (event.action, event.resource) == ("queue.set", "queue/vision")
    assert event.details["nominal"]["gpus"] == 8 and event.details["previous"] is None

    # replacing it keeps one row, records what it was
    queues.set_queue(ctx, name="vision", nominal=QuotaSpec(gpus=2))
    assert stored(ctx) == [("vision", {"gpus": 2.0}, 1.0)]
    assert audit.list_audit_events(ctx)[-1].details["previous"]["weight"] == 2.0


BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"nominal": Quota(gpus=-1)}, "nominal.gpus"),
    ({"nominal": Quota(cpus=math.nan)}, "nominal.cpus"),
    ({"nominal": Quota(memory_mb=-5)}, "nominal.memory_mb"),
    ({"nominal": QuotaSpec(gpus=math.inf)}, "nominal.gpus"),
    ({"nominal": Quota(gpus=True)}, "nominal.gpus"),  # type: ignore[arg-type]
    ({"nominal": Quota(memory_mb=1.5)}, "nominal.memory_mb"),  # type: ignore[arg-type]
    ({"nominal": Quota(gpus_by_model={"": 1})}, "nominal.gpus_by_model"),
    ({"nominal": Quota(gpus_by_model={"A100": -2})}, "nominal.gpus_by_model[A100]"),
    ({"nominal": Quota(gpus_by_model={"A100\n": 1, "A100": 2})}, "nominal.gpus_by_model"),
    ({"borrowing_limit": Quota(gpus=-0.5)}, "borrowing_limit.gpus"),
    ({"weight": 0}, "weight"),
    ({"weight": -1.0}, "weight"),
    ({"weight": math.inf}, "weight"),
    ({"cohort": "../lab"}, "cohort"),
    ({"name": "bad name"}, "name"),
    ({"name": ""}, "name"),
]


def test_bad_queue_settings_are_refused_naming_the_field_and_nothing_changes(
    ctx: Context,
) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8))
    before = stored(ctx)

    for arguments, field in BAD_SETTINGS:
        call: dict[str, Any] = {"name": "vision", **arguments}
        with pytest.raises(InvalidInputError) as caught:
            queues.set_queue(ctx, **call)
        assert caught.value.field == field, (arguments, caught.value.message)

    assert stored(ctx) == before


def test_only_server_admins_configure_queues_but_anyone_signed_in_reads_them(
    ctx: Context,
) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8))
    alice = viewer(ctx, vision=Role.ADMIN)  # a project admin, not a server admin

    with pytest.raises(PermissionDeniedError) as caught:
        queues.set_queue(alice, name="vision", nominal=Quota(gpus=80))
    assert "server admins" in caught.value.message
    with pytest.raises(PermissionDeniedError):
        queues.delete_queue(alice, name="vision")

    assert stored(ctx) == [("vision", {"gpus": 8.0}, 1.0)]
    assert [q.name for q in queues.list_queues(alice)] == ["vision"]
    assert queues.get_queue(alice, name="vision").nominal.gpus == 8


def test_usage_borrowed_running_and_waiting_come_from_the_job_rows(ctx: Context) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=4, cpus=100), cohort="lab")
    a = add_job(ctx, project="vision", gpus=2, cpus=2, memory_mb=1000, workers=2)  # 4 GPUs
    b = add_job(ctx, project="vision", gpus=2, cpus=1, memory_mb=500)  # borrowed
    add_job(ctx, project="nlp", gpus=1)  # another queue
    add_job(ctx, project="vision", status=JobStatus.SUCCEEDED, gpus=8)  # finished: no usage
    old = add_job(
        ctx,
        project="vision",
        status=JobStatus.QUEUED,
        gpus=1,
        age_s=60,
        message="waiting: queue vision is at its GPU quota 6/4",
    )
    urgent = add_job(
        ctx, project="vision", status=JobStatus.QUEUED, gpus=1, priority=100, message=""
    )
    young = add_job(ctx, project="vision", status=JobStatus.QUEUED, gpus=1, age_s=1, message="x")

    view = queues.get_queue(ctx, name="vision")

    assert (view.usage.gpus, view.usage.cpus, view.usage.memory_mb) == (6.0, 5.0, 2500)
    assert view.borrowed.gpus == 2.0 and view.borrowed.cpus == 0.0
    assert view.borrowed.memory_mb == 0  # memory is unlimited: nothing to borrow
    assert sorted(view.running) == sorted([a, b]) and view.running_count == 2
    assert [(w.position, w.job_id) for w in view.waiting] == [(1, urgent), (2, old), (3, young)]
    assert view.waiting[1].reason == "waiting: queue vision is at its GPU quota 6/4"
    assert view.waiting[0].reason == "waiting: queued"  # no reason recorded yet
    assert view.message == ""  # in a cohort with an unlimited borrowing limit: may borrow

    listed = {q.name: q for q in queues.list_queues(ctx)}
    assert set(listed) == {"nlp", "vision"}  # nlp: its project's default queue, not configured
    assert not listed["nlp"].configured and listed["nlp"].usage.gpus == 1.0
    assert listed["nlp"].nominal == QuotaSpec()  # unlimited


def test_per_model_usage_counts_jobs_that_asked_for_the_model(ctx: Context) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8, gpus_by_model={"A100": 2}))
    add_job(ctx, project="vision", gpus=2, gpu_type="a100")
    add_job(ctx, project="vision", gpus=1)  # any model: counts under gpus only

    view = queues.get_queue(ctx, name="vision")

    assert view.gpus_by_model == {"A100": 2.0}
    assert view.usage.gpus == 3.0


def test_a_quota_shrunk_below_use_keeps_running_jobs_and_says_new_ones_wait(
    ctx: Context,
) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8))
    running = [add_job(ctx, project="vision", gpus=4) for _ in range(2)]

    view = queues.set_queue(ctx, name="vision", nominal=Quota(gpus=4))

    assert view.nominal.gpus == 4 and view.usage.gpus == 8
    assert "uses 8 GPUs (may hold 4)" in view.message
    assert "running jobs keep running" in view.message
    with ctx.db.read() as s:
        statuses = {r.id: r.status for r in s.scalars(select(JobRow))}
        configs = queues.load_configs(s)
    assert statuses == dict.fromkeys(running, "running")  # nothing stopped or failed
    assert configs["vision"].nominal.gpus == 4.0  # what admission now holds new jobs to

    # new ones wait: the policy, fed the stored quota, admits nothing more in this queue
    node = Node(id="n1", cpus=64, memory_mb=512_000, gpus=tuple(Gpu(index=i) for i in range(16)))
    snapshot = Snapshot(
        now=0.0,
        nodes=[node],
        queues=configs,
        pending=[PendingJob(id="new", queue="vision", demand=Demand(gpus=1))],
        running=[
            RunningJob(
                id=job_id,
                queue="vision",
                demand=Demand(gpus=4),
                placement=Placement(
                    job_id=job_id,
                    workers=(WorkerPlacement(node_id="n1", gpus=tuple(range(4 * i, 4 * i + 4))),),
                ),
            )
            for i, job_id in enumerate(running)
        ],
    )
    checked = []
    for name in POLICIES:
        if name in ("default", "drf"):
            try:
                policy = get_policy(name)
            except ImportError:  # not written yet
                continue
            decision = policy.decide(snapshot)
            assert decision.admit == [] and decision.preempt == [], (name, decision)
            assert "new" in decision.waiting, (name, decision)
            assert "quota" in decision.waiting["new"], decision.waiting["new"]
            checked.append(name)
    assert checked, "neither the default nor the drf policy is there"


def test_check_submit_refuses_an_unknown_queue_listing_the_configured_ones(ctx: Context) -> None:
    queues.set_queue(ctx, name="shared", nominal=Quota(gpus=8))
    with ctx.db.read() as s:
        assert queues.check_submit(s, project="vision", queue=None, gpu_type=None, nodes=None) == (
            "vision"
        )
        assert queues.check_submit(s, project="vision", queue="vision", gpu_type=None, nodes=None)
        assert (
            queues.check_submit(s, project="vision", queue="shared", gpu_type=None, nodes=None)
            == "shared"
        )
        with pytest.raises(InvalidInputError) as caught:
            queues.check_submit(s, project="vision", queue="nlp", gpu_type=None, nodes=None)
        with pytest.raises(InvalidInputError) as bad_name:
            queues.check_submit(s, project="vision", queue="../x", gpu_type=None, nodes=None)
    assert caught.value.field == "queue"
    assert "queue 'nlp' does not exist" in caught.value.message
    assert "the configured queues are: shared" in caught.value.message
    assert bad_name.value.field == "queue"


def test_check_submit_refuses_a_gpu_model_no_node_has_listing_the_cluster_models(
    ctx: Context,
) -> None:
    nodes = [
        Node(id="a", cpus=8, memory_mb=1000, gpus=(Gpu(index=0, model="NVIDIA A100-SXM4-80GB"),)),
        Node(id="b", cpus=8, memory_mb=1000, gpus=(Gpu(index=0, model="NVIDIA H100"),) * 2),
    ]
    with ctx.db.read() as s:
        queues.check_submit(s, project="p", queue=None, gpu_type="a100", nodes=nodes)
        queues.check_submit(s, project="p", queue=None, gpu_type="V100", nodes=None)  # unknown
        with pytest.raises(InvalidInputError) as caught:
            queues.check_submit(s, project="p", queue=None, gpu_type="V100", nodes=nodes)
        with pytest.raises(InvalidInputError) as none:
            queues.check_submit(s, project="p", queue=None, gpu_type="V100", nodes=nodes[:0])
    assert caught.value.field == "resources.gpu_type"
    assert "no node has a GPU of model 'V100'" in caught.value.message
    assert "NVIDIA A100-SXM4-80GB (1), NVIDIA H100 (2)" in caught.value.message
    assert "the cluster has no GPUs" in none.value.message


def test_unknown_queues_are_not_found_and_a_project_queue_is_unlimited(ctx: Context) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8))
    with pytest.raises(NotFoundError) as caught:
        queues.get_queue(ctx, name="nope")
    assert caught.value.field == "name"
    assert "the configured queues are: vision" in caught.value.message
    with pytest.raises(NotFoundError):
        queues.delete_queue(ctx, name="nope")

    with ctx.db.transaction() as s:
        project_id(s, "nlp", create=True)
    own = queues.get_queue(ctx, name="nlp")
    assert not own.configured and own.nominal == QuotaSpec() and own.waiting == []


def test_delete_makes_a_queue_unlimited_and_is_audited(ctx: Context) -> None:
    queues.set_queue(ctx, name="vision", nominal=Quota(gpus=8))
    add_job(ctx, project="vision", gpus=2)

    queues.delete_queue(ctx, name="vision")

    assert stored(ctx) == []
    view = queues.get_queue(ctx, name="vision")  # its jobs are still there
    assert not view.configured and view.usage.gpus == 2.0
    event = audit.list_audit_events(ctx)[-1]
    assert (event.action, event.resource) == ("queue.delete", "queue/vision")


def test_job_ids_of_projects_the_caller_cannot_see_are_hidden(ctx: Context) -> None:
    queues.set_queue(ctx, name="shared", nominal=Quota(gpus=8))
    mine = add_job(ctx, project="alpha", queue="shared", gpus=1)
    add_job(ctx, project="beta", queue="shared", gpus=2)
    waiting = add_job(ctx, project="beta", queue="shared", status=JobStatus.QUEUED, message="w")
    add_job(ctx, project="beta", gpus=1)  # beta's own queue: alice does not see it listed

    alice = viewer(ctx, alpha=Role.VIEWER)
    view = queues.get_queue(alice, name="shared")

    assert view.running == [mine] and view.running_count == 2
    assert view.usage.gpus == 3.0  # the totals count every job
    assert [(w.job_id, w.project, w.reason) for w in view.waiting] == [("", "", "w")]
    assert [q.name for q in queues.list_queues(alice)] == ["shared"]
    # beta's own queue answers alice like a missing one: project names do not leak
    with pytest.raises(NotFoundError) as hidden:
        queues.get_queue(alice, name="beta")
    with pytest.raises(NotFoundError) as missing:
        queues.get_queue(alice, name="gamma")
    assert hidden.value.message == missing.value.message.replace("gamma", "beta")
    assert queues.get_queue(alice, name="alpha").configured is False  # her own project's
    assert waiting in [w.job_id for w in queues.get_queue(ctx, name="shared").waiting]


# --- through the real submit and admission pipeline ----------------------------------------


@pytest.fixture
def gpu_ctx(tmp_path: Path) -> Iterator[Context]:
    settings = Settings(
        home=tmp_path / "gpu-home", cpus=8, memory_mb=16_000, gpus=2, gpu_model="A100"
    )
    context = open_context(settings, actor="tester")
    yield context
    for job in jobs.list_jobs(context):
        if not job.status.finished:
            jobs.cancel_job(context, job_id=job.id)
    for job in jobs.list_jobs(context):
        jobs.wait_job(context, job_id=job.id, timeout=30)
    forget_database(settings.database_url)


def test_submit_refuses_an_unknown_queue_or_gpu_model_and_stores_nothing(gpu_ctx: Context) -> None:
    queues.set_queue(gpu_ctx, name="shared", nominal=Quota(gpus=1))
    cases = [
        (JobSpec(command=["true"], queue="nope"), "queue", "queue 'nope' does not exist"),
        (
            JobSpec(command=["true"], resources=Resources(gpus=1, gpu_type="H100")),
            "resources.gpu_type",
            "no node has a GPU of model 'H100' (the cluster's GPUs are: A100 (2))",
        ),
    ]
    for spec, field, text in cases:
        with pytest.raises(InvalidInputError) as caught:
            jobs.submit_job(gpu_ctx, project="vision", spec=spec)
        assert caught.value.field == field
        assert text in caught.value.message
    assert jobs.list_jobs(gpu_ctx) == []


def test_a_quota_shrunk_under_running_jobs_lets_them_run_and_new_ones_wait(
    gpu_ctx: Context,
) -> None:
    queues.set_queue(gpu_ctx, name="vision", nominal=Quota(gpus=2))
    sleep = JobSpec(
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        resources=Resources(gpus=1, cpus=0.5, memory_mb=64),
    )
    first = [jobs.submit_job(gpu_ctx, project="vision", spec=sleep).id for _ in range(2)]
    wait_for(
        lambda: all(jobs.get_job(gpu_ctx, job_id=j).status is JobStatus.RUNNING for j in first),
        timeout=30,
        what="both jobs to run",
    )

    view = queues.set_queue(gpu_ctx, name="vision", nominal=Quota(gpus=1))
    late = jobs.submit_job(gpu_ctx, project="vision", spec=sleep)
    admission.step(gpu_ctx)

    assert "uses 2 GPUs (may hold 1)" in view.message
    assert [jobs.get_job(gpu_ctx, job_id=j).status for j in first] == [JobStatus.RUNNING] * 2
    waiting = jobs.get_job(gpu_ctx, job_id=late.id)
    assert waiting.status is JobStatus.QUEUED
    assert waiting.message.startswith("waiting") and "quota" in waiting.message
    shown = queues.get_queue(gpu_ctx, name="vision")
    assert shown.usage.gpus == 2.0 and sorted(shown.running) == sorted(first)
    assert [(w.job_id, w.position, w.reason) for w in shown.waiting] == [
        (late.id, 1, waiting.message)
    ]
