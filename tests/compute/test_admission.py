"""The admission pipeline (``compute.admission``) on a real SQLite store, against an executor that
runs nothing.

``RecordingExecutor`` is a real ``Executor`` subclass, registered in ``shipyard.wiring`` only for
these tests: it launches nothing, records every call, and reports the outcomes a test tells it
to, so the pipeline's decisions (admit, wait, preempt, requeue, fail) are checked exactly and
fast. The local executor's own behaviour is covered by tests/compute/test_jobs.py and
tests/compute/executors/.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from shipyard import wiring
from shipyard.compute import admission, jobs, records
from shipyard.compute.executors.base import (
    Executor,
    ExecutorUnavailableError,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy.base import MAX_PREEMPTIONS, Gpu, Node
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.errors import InvalidInputError, ResourceUnavailableError
from shipyard.security.audit import list_events
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import JobRow, RunRow, utcnow

NODE = Node(
    id="node-a",
    cpus=4.0,
    memory_mb=8192,
    gpus=(Gpu(index=0, model="NVIDIA A100"), Gpu(index=1, model="NVIDIA A100")),
)


class RecordingExecutor(Executor):
    """Runs nothing; records launches and stops; reports what ``outcomes`` holds."""

    name = "recording"

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.nodes_: list[Node] = [NODE]
        self.launched: list[Launch] = []
        self.stopped: list[tuple[str, StopReason, float]] = []
        self.outcomes: dict[str, Observation] = {}
        self.down: str | None = None  # nodes() and launch() raise ExecutorUnavailableError
        self.launch_down: str | None = None  # only launch() does
        self.finish_on_stop = True  # a stop ends the job at the next look
        self.on_launch: Any = None  # called with the Launch, before it returns

    def nodes(self) -> list[NodeInfo]:
        if self.down:
            raise ExecutorUnavailableError(self.down)
        return [NodeInfo(node=n, hostname=n.id) for n in self.nodes_]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        if self.down or self.launch_down:
            raise ExecutorUnavailableError(self.down or self.launch_down or "")
        self.launched.append(launch)
        if self.on_launch is not None:
            self.on_launch(launch)
        return {"name": f"{launch.job_id}-{launch.attempt}"}

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        return {
            job_id: self.outcomes.pop(job_id) for job_id in list(self.outcomes) if job_id in refs
        }

    def stop(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any], *, reason: StopReason, grace_s: float
    ) -> None:
        self.stopped.append((job_id, reason, grace_s))
        if not self.finish_on_stop or reason == "lost":
            return
        if reason == "preempt":
            self.outcomes[job_id] = Observation(
                job_id=job_id, state="finished", preempted=True, message="stopped for preemption"
            )
        else:
            self.outcomes[job_id] = Observation(
                job_id=job_id,
                state="finished",
                status=JobStatus.CANCELLED,
                exit_code=-15,
                message="cancelled while running",
            )

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        return b"", 0

    # test helpers
    def finish(self, job_id: str, exit_code: int = 0) -> None:
        self.outcomes[job_id] = Observation(
            job_id=job_id,
            state="finished",
            status=JobStatus.SUCCEEDED if exit_code == 0 else JobStatus.FAILED,
            exit_code=exit_code,
            message=f"exited with code {exit_code}",
        )

    def lose(self, job_id: str) -> None:
        self.outcomes[job_id] = Observation(
            job_id=job_id, state="lost", node_id="node-a", message="node node-a died"
        )

    def launches_of(self, job_id: str) -> list[int]:
        return [launch.attempt for launch in self.launched if launch.job_id == job_id]


@pytest.fixture
def rctx(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    """An embedded home whose executor is a fresh RecordingExecutor."""
    monkeypatch.setitem(wiring.EXECUTORS, "recording", f"{__name__}:RecordingExecutor")
    context = open_context(dataclasses.replace(settings, executor="recording"), actor="tester")
    yield context
    wiring.close_executors()
    forget_database(settings.database_url)


@pytest.fixture
def server_pipeline() -> Iterator[None]:
    """As if this process ran a server's background pipeline (submits wake it)."""
    admission.background(True)
    yield
    admission.background(False)


def served(ctx: Context) -> Context:
    """The same home as a server with a background pipeline sees it: no inline steps."""
    assert admission.in_background(), "use the server_pipeline fixture"
    return dataclasses.replace(
        ctx, settings=dataclasses.replace(ctx.settings, server_url="http://127.0.0.1:1")
    )


def executor(ctx: Context) -> RecordingExecutor:
    found = wiring.open_executor(ctx.settings.executor, ctx.settings)
    assert isinstance(found, RecordingExecutor)
    return found


def spec(**fields: Any) -> JobSpec:
    return JobSpec(command=[sys.executable, "-c", "pass"], **fields)


def row(ctx: Context, job_id: str) -> JobRow:
    with ctx.db.read() as s:
        found: JobRow | None = s.get(JobRow, job_id)
        assert found is not None
        return found


def job_updates(ctx: Context) -> list[str]:
    """Collects every UPDATE of the jobs table issued while it is alive."""
    seen: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            seen.append(statement)

    event.listen(ctx.db.engine, "before_cursor_execute", listen)
    return seen


# --- submit is cheap ----------------------------------------------------------------------------


def test_submit_only_queues_and_a_step_admits_and_launches_once(
    rctx: Context, server_pipeline: None
) -> None:
    server = served(rctx)
    admission.WAKE.clear()
    job = jobs.submit_job(server, project="p", spec=spec(name="train"))
    assert job.status is JobStatus.QUEUED and job.attempt == 1 and job.queue == "p"
    assert admission.WAKE.is_set(), "a submit in a server wakes its pipeline"
    assert executor(server).launched == []
    # every job gets a run, so that each attempt attaches to it
    with rctx.db.read() as s:
        run = s.get(RunRow, job.run_id)
        assert run is not None and run.tags == {"shipyard.job_id": job.id} and run.name == "train"
    result = admission.step(server)
    assert result.admitted == [job.id] and result.launched == [job.id]
    stored = row(rctx, job.id)
    assert stored.status == "running" and stored.executor == "recording"
    assert stored.executor_ref == {"name": f"{job.id}-1"}
    assert stored.lock_token is None and stored.lock_expires_at is None, "lease released"
    assert stored.placement == [{"node_id": "node-a", "gpus": [], "gpu_share": 0.0}]
    assert admission.step(server).launched == []
    assert executor(server).launches_of(job.id) == [1]


def test_an_embedded_submit_steps_inline(rctx: Context) -> None:
    job = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=2)))
    assert job.status is JobStatus.RUNNING
    assert job.assigned_gpus == [0, 1]
    assert job.placement == [{"node_id": "node-a", "gpus": [0, 1], "gpu_share": 0.0}]
    executor(rctx).finish(job.id)
    admission.step(rctx)
    done = jobs.get_job(rctx, job_id=job.id)
    assert done.status is JobStatus.SUCCEEDED and done.exit_code == 0


def test_waiting_jobs_say_why_and_the_reason_is_written_once(rctx: Context) -> None:
    first = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=2)))
    second = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=1)))
    waiting = jobs.get_job(rctx, job_id=second.id)
    assert waiting.status is JobStatus.QUEUED
    assert waiting.message.startswith("waiting: "), waiting.message
    updates = job_updates(rctx)
    admission.step(rctx)
    assert updates == [], "an unchanged reason is not written again"
    executor(rctx).finish(first.id)
    admission.step(rctx)
    assert jobs.get_job(rctx, job_id=second.id).status is JobStatus.RUNNING


# --- bad input at submit ------------------------------------------------------------------------


def test_resources_no_node_could_hold_are_refused_naming_the_largest_node(rctx: Context) -> None:
    for resources, words in [
        (Resources(gpus=3), "needs 3 GPUs; the largest node (node-a) has 2"),
        (Resources(cpus=16), "needs 16 CPUs; the largest node (node-a) has 4"),
        (Resources(memory_mb=9000), "needs 9000 MB of memory; the largest node (node-a)"),
    ]:
        with pytest.raises(ResourceUnavailableError) as err:
            jobs.submit_job(rctx, project="p", spec=spec(resources=resources))
        assert err.value.field == "resources"
        assert words in err.value.message
    with pytest.raises(InvalidInputError) as bad:
        jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=1, gpu_type="H100")))
    assert bad.value.field == "resources.gpu_type" and "NVIDIA A100" in bad.value.message
    with pytest.raises(InvalidInputError) as bad:
        jobs.submit_job(rctx, project="p", spec=spec(queue="nosuchqueue"))
    assert bad.value.field == "queue"
    assert jobs.list_jobs(rctx) == []
    with rctx.db.read() as s:
        assert s.scalars(select(RunRow.id)).all() == [], "no run is left behind either"


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"resources": {"gpus": 1, "gpu_fraction": 0.5}}, "gpu_fraction"),
        ({"resources": {"gpu_fraction": 1.0}}, "gpu_fraction"),
        ({"resources": {"gpu_fraction": 0.0}}, "gpu_fraction"),
        ({"workers": 0}, "workers"),
        ({"workers": 257}, "workers"),
        ({"outputs": ["../model.pt"]}, "outputs"),
        ({"outputs": ["/abs/model.pt"]}, "outputs"),
        ({"priority": 1001}, "priority"),
    ],
    ids=lambda v: str(v),
)
def test_bad_specs_name_the_field(fields: dict[str, Any], where: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({"command": ["python"], **fields})
    assert where in str(err.value)


def test_a_good_spec_counts_its_gpu_units() -> None:
    assert JobSpec(command=["x"], workers=4, resources=Resources(gpus=2)).gpu_units == 8.0
    assert JobSpec(command=["x"], resources=Resources(gpu_fraction=0.25)).gpu_units == 0.25
    assert JobSpec(command=["x"], outputs=["model.pt", "out/metrics.json"]).outputs


# --- the executor is down -----------------------------------------------------------------------


def test_an_unreachable_executor_keeps_jobs_queued_with_the_reason(rctx: Context) -> None:
    runner = executor(rctx)
    runner.down = "ray://head:10001 is not answering"
    job = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=64)))
    # the size is not checked while the nodes are unknown: it waits, it is not refused
    assert job.status is JobStatus.QUEUED
    assert job.message == "waiting: executor unavailable: ray://head:10001 is not answering"
    assert admission.step(rctx).unavailable == runner.down
    small = jobs.submit_job(rctx, project="p", spec=spec())
    assert jobs.get_job(rctx, job_id=small.id).message.startswith("waiting: executor unavailable")
    runner.down = None
    admission.step(rctx)
    assert jobs.get_job(rctx, job_id=small.id).status is JobStatus.RUNNING
    big = jobs.get_job(rctx, job_id=job.id)
    assert big.status is JobStatus.FAILED
    assert big.message.startswith("unschedulable: needs 64 GPUs; the largest node (node-a)")


def test_a_launch_refused_for_now_goes_back_to_the_queue_not_a_new_attempt(rctx: Context) -> None:
    runner = executor(rctx)
    runner.launch_down = "the cluster is restarting"
    job = jobs.submit_job(rctx, project="p", spec=spec())
    stored = row(rctx, job.id)
    assert stored.status == "queued" and stored.attempt == 1
    assert stored.message == "waiting: executor unavailable: the cluster is restarting"
    assert stored.placement == [] and stored.lock_token is None
    runner.launch_down = None
    admission.step(rctx)
    assert row(rctx, job.id).status == "running"
    assert runner.launches_of(job.id) == [1]


# --- requeue, lost, cancel ----------------------------------------------------------------------


def test_a_preempted_outcome_requeues_the_job_for_its_next_attempt(rctx: Context) -> None:
    job = jobs.submit_job(
        rctx, project="p", spec=spec(preemptible=True, resources=Resources(gpus=2))
    )
    with rctx.db.transaction() as s:  # as if it had run for 100 s
        stored = s.get(JobRow, job.id)
        assert stored is not None
        stored.started_at = utcnow() - timedelta(seconds=100)
    runner = executor(rctx)
    runner.outcomes[job.id] = Observation(
        job_id=job.id, state="finished", preempted=True, message="preempted for job x"
    )
    result = admission.step(rctx)
    assert result.requeued == [job.id]
    again = jobs.get_job(rctx, job_id=job.id)
    # requeued, and with the whole machine free again it starts its second attempt at once
    assert again.status is JobStatus.RUNNING and again.attempt == 2 and again.preemptions == 1
    assert runner.launches_of(job.id) == [1, 2]
    assert 199.0 < row(rctx, job.id).attained_gpu_s < 210.0  # 2 GPUs x 100 s
    with rctx.db.read() as s:
        run = s.get(RunRow, job.run_id)
        assert run is not None and run.status == "running", "the run waits for the next attempt"
        actions = [e.action for e in list_events(s, limit=100) if e.resource.endswith(job.id)]
    assert actions == ["job.submit", "job.start", "job.requeue", "job.start"]


def test_a_lost_job_is_requeued_when_preemptible_else_failed_naming_the_node(
    rctx: Context,
) -> None:
    runner = executor(rctx)
    keep = jobs.submit_job(rctx, project="p", spec=spec(preemptible=True))
    plain = jobs.submit_job(rctx, project="p", spec=spec())
    runner.lose(keep.id)
    runner.lose(plain.id)
    admission.step(rctx)
    failed = jobs.get_job(rctx, job_id=plain.id)
    assert failed.status is JobStatus.FAILED and "node node-a died" in failed.message
    kept = jobs.get_job(rctx, job_id=keep.id)
    assert kept.attempt == 2 and kept.preemptions == 0 and kept.status is JobStatus.RUNNING
    assert "lost" in {reason for _, reason, _ in runner.stopped}
    # lost again and again: after MAX_PREEMPTIONS requeues it fails
    for _ in range(MAX_PREEMPTIONS):
        runner.lose(keep.id)
        admission.step(rctx)
    gone = jobs.get_job(rctx, job_id=keep.id)
    assert gone.status is JobStatus.FAILED and gone.attempt == MAX_PREEMPTIONS + 1
    assert "node node-a died" in gone.message


def test_an_observation_of_an_earlier_attempt_never_ends_a_later_one(rctx: Context) -> None:
    job = jobs.submit_job(rctx, project="p", spec=spec(preemptible=True))
    assert records.requeue_job(rctx, job_id=job.id, message="test", preempted=True, attempt=1)
    admission.step(rctx)
    assert row(rctx, job.id).attempt == 2
    assert not records.finish_job(
        rctx, job_id=job.id, status=JobStatus.FAILED, message="late news", attempt=1
    )
    assert records.requeue_job(rctx, job_id=job.id, message="x", preempted=True, attempt=1) is None
    assert row(rctx, job.id).status == "running"


def test_cancel_queued_at_once_running_through_the_executor(
    rctx: Context, server_pipeline: None
) -> None:
    runner = executor(rctx)
    running = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=2)))
    queued = jobs.submit_job(rctx, project="p", spec=spec(resources=Resources(gpus=2)))
    assert jobs.cancel_job(rctx, job_id=queued.id).status is JobStatus.CANCELLED
    assert runner.launches_of(queued.id) == []
    server = served(rctx)  # no inline step: the executor has been told, the job still runs
    still = jobs.cancel_job(server, job_id=running.id)
    assert still.status is JobStatus.RUNNING and row(rctx, running.id).cancel_requested
    assert (running.id, "cancel", admission.STOP_GRACE_S) in executor(server).stopped
    assert jobs.cancel_job(server, job_id=running.id).status is JobStatus.RUNNING  # idempotent
    admission.step(server)
    assert jobs.get_job(rctx, job_id=running.id).status is JobStatus.CANCELLED
    assert runner.launches_of(running.id) == [1]


def test_a_cancel_while_the_job_is_being_launched_stops_it_once_launched(
    rctx: Context,
) -> None:
    runner = executor(rctx)

    def cancel_meanwhile(launch: Launch) -> None:  # what cancel_job does before the ref exists
        with rctx.db.transaction() as s:
            stored = s.get(JobRow, launch.job_id)
            assert stored is not None and not stored.executor_ref
            stored.cancel_requested = True

    runner.on_launch = cancel_meanwhile
    job = jobs.submit_job(rctx, project="p", spec=spec())
    assert (job.id, "cancel", admission.STOP_GRACE_S) in runner.stopped
    admission.step(rctx)
    assert jobs.get_job(rctx, job_id=job.id).status is JobStatus.CANCELLED


def test_cancel_during_preemption_cancels_and_never_requeues(rctx: Context) -> None:
    """The stop for the preemption is under way when the user cancels: the job ends CANCELLED
    even though its executor then reports it preempted."""
    runner = executor(rctx)
    runner.finish_on_stop = False
    low = jobs.submit_job(
        rctx, project="p", spec=spec(preemptible=True, priority=-100, resources=Resources(gpus=2))
    )
    high = jobs.submit_job(rctx, project="p", spec=spec(priority=100, resources=Resources(gpus=2)))
    victim = row(rctx, low.id)
    assert victim.preempt_requested and victim.message.startswith("preempting: ")
    assert (low.id, "preempt", rctx.settings.preempt_grace_s) in runner.stopped
    jobs.cancel_job(rctx, job_id=low.id)
    runner.outcomes[low.id] = Observation(
        job_id=low.id, state="finished", preempted=True, message="stopped for preemption"
    )
    admission.step(rctx)
    done = jobs.get_job(rctx, job_id=low.id)
    assert done.status is JobStatus.CANCELLED and done.attempt == 1
    assert runner.launches_of(low.id) == [1], "never relaunched"
    assert jobs.get_job(rctx, job_id=high.id).status is JobStatus.RUNNING


def test_a_higher_priority_job_preempts_and_the_victim_resumes_later(rctx: Context) -> None:
    runner = executor(rctx)
    low = jobs.submit_job(
        rctx, project="p", spec=spec(preemptible=True, priority=-100, resources=Resources(gpus=2))
    )
    high = jobs.submit_job(rctx, project="p", spec=spec(priority=100, resources=Resources(gpus=2)))
    assert jobs.get_job(rctx, job_id=high.id).status is JobStatus.QUEUED
    admission.step(rctx)  # the victim has stopped: requeued; the high one starts
    assert jobs.get_job(rctx, job_id=high.id).status is JobStatus.RUNNING
    victim = jobs.get_job(rctx, job_id=low.id)
    assert victim.status is JobStatus.QUEUED and victim.attempt == 2 and victim.preemptions == 1
    assert victim.message.startswith("waiting: ")
    runner.finish(high.id)
    admission.step(rctx)
    assert jobs.get_job(rctx, job_id=low.id).status is JobStatus.RUNNING
    assert runner.launches_of(low.id) == [1, 2]


def test_a_job_preempted_max_times_is_not_preempted_again(rctx: Context) -> None:
    """After MAX_PREEMPTIONS preemptions the job runs to its end unpreemptible (it is not
    failed): a higher-priority job then waits for it."""
    runner = executor(rctx)
    low = jobs.submit_job(
        rctx, project="p", spec=spec(preemptible=True, priority=-100, resources=Resources(gpus=2))
    )
    for n in range(MAX_PREEMPTIONS):
        high = jobs.submit_job(
            rctx, project="p", spec=spec(priority=100, resources=Resources(gpus=2))
        )
        admission.step(rctx)  # low stopped and requeued, high runs
        assert jobs.get_job(rctx, job_id=low.id).preemptions == n + 1
        runner.finish(high.id)
        admission.step(rctx)  # high done, low's next attempt starts
        assert jobs.get_job(rctx, job_id=low.id).status is JobStatus.RUNNING
    last = jobs.submit_job(rctx, project="p", spec=spec(priority=100, resources=Resources(gpus=2)))
    admission.step(rctx)
    assert jobs.get_job(rctx, job_id=low.id).status is JobStatus.RUNNING
    assert not row(rctx, low.id).preempt_requested
    assert jobs.get_job(rctx, job_id=last.id).status is JobStatus.QUEUED
    runner.finish(low.id)
    admission.step(rctx)
    done = jobs.get_job(rctx, job_id=low.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempt == MAX_PREEMPTIONS + 1
    assert jobs.get_job(rctx, job_id=last.id).status is JobStatus.RUNNING


# --- leases -------------------------------------------------------------------------------------


def test_a_job_whose_launcher_died_is_relaunched_once_then_failed(rctx: Context) -> None:
    runner = executor(rctx)
    job = jobs.submit_job(rctx, project="p", spec=spec())

    def launcher_died(token: str) -> None:  # admitted, lease taken, never launched
        with rctx.db.transaction() as s:
            stored = s.get(JobRow, job.id)
            assert stored is not None
            stored.executor_ref = None
            stored.lock_token = token
            stored.lock_expires_at = utcnow() - timedelta(seconds=1)

    launcher_died("some-other-process")
    admission.step(rctx)
    assert runner.launches_of(job.id) == [1, 1]
    assert row(rctx, job.id).executor_ref and row(rctx, job.id).lock_token is None
    launcher_died("r:the-process-that-relaunched-it")
    admission.step(rctx)
    failed = jobs.get_job(rctx, job_id=job.id)
    assert failed.status is JobStatus.FAILED and "lost before it started" in failed.message
    assert runner.launches_of(job.id) == [1, 1]


def test_an_unexpired_lease_is_left_alone(rctx: Context) -> None:
    runner = executor(rctx)
    job = jobs.submit_job(rctx, project="p", spec=spec())
    with rctx.db.transaction() as s:
        stored = s.get(JobRow, job.id)
        assert stored is not None
        stored.executor_ref = None
        stored.lock_token = "another-live-process"
        stored.lock_expires_at = utcnow() + timedelta(seconds=admission.LEASE_S)
    admission.step(rctx)
    assert runner.launches_of(job.id) == [1]
    assert not records.record_launch(rctx, job_id=job.id, ref={"x": 1}, token="not-the-holder")


def test_an_unknown_executor_url_is_refused_naming_the_field(settings: Settings) -> None:
    with pytest.raises(InvalidInputError) as err:
        wiring.open_executor("kubernetes://cluster", settings)
    assert err.value.field == "executor" and "ray://HOST:PORT" in err.value.message
    assert wiring.executor_scheme("ray://10.0.0.1:10001") == "ray"
    assert Settings.from_env({"SHIPYARD_EXECUTOR": "ray://h:1"}).executor == "ray://h:1"
    assert Settings.from_env({}).executor == "local"


# --- migration 0007 -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    from tests.pg import create_database, drop_database

    url = create_database(request.getfixturevalue("postgres_url"))
    yield url
    drop_database(url)


def test_migration_0007_moves_the_pids_into_the_executor_ref(old_db_url: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine, inspect, text

    from shipyard.store.migrate import alembic_config, upgrade

    engine = create_engine(old_db_url)
    try:
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO projects (id, name, created_at) "
                    "VALUES ('p1', 'vision', '2026-01-01')"
                )
            )
            for job_id, status, sup in [("j1", "running", 4242), ("j2", "succeeded", None)]:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, project_id, name, spec, status, priority, cpus, "
                        "memory_mb, gpus, assigned_gpus, message, usage, cancel_requested, "
                        "supervisor_pid, supervisor_started, pid, created_at, created_by) VALUES "
                        "(:id, 'p1', 'j', '{}', :status, 0, 1.0, 512, 2, '[0, 1]', '', '{}', "
                        ":false, :sup, 123.5, 4243, '2026-01-01', 'me')"
                    ),
                    {"id": job_id, "status": status, "sup": sup, "false": False},
                )
        upgrade(engine)
        with engine.connect() as conn:
            got = {
                r.id: r
                for r in conn.execute(
                    text(
                        "SELECT id, executor, executor_ref, queue, gpu_units, attempt, placement, "
                        "preemptible, outputs FROM jobs"
                    )
                )
            }
            columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()
    assert not {"supervisor_pid", "supervisor_started", "pid"} & columns

    def parsed(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    running, done = got["j1"], got["j2"]
    ref = parsed(running.executor_ref)
    assert ref["supervisor_pid"] == 4242 and ref["supervisor_started"] == 123.5
    assert ref["pid"] == 4243 and ref["host"]
    assert parsed(running.placement)[0]["gpus"] == [0, 1]
    assert parsed(done.executor_ref) is None and parsed(done.placement) == []
    for r in (running, done):
        assert (r.executor, r.queue, r.gpu_units, r.attempt) == ("local", "vision", 2.0, 1)
        assert not r.preemptible and parsed(r.outputs) == []


def test_shipyard_server_refuses_an_unknown_executor(home: Any) -> None:
    import os
    import subprocess

    env = {**os.environ, "SHIPYARD_HOME": str(home)}
    env.pop("SHIPYARD_URL", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard.cli",
            "server",
            "--executor",
            "kubernetes://c",
            "--port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode != 0
    assert (
        "executor 'kubernetes://c' is not known" in out.stderr and "ray://HOST:PORT" in out.stderr
    )
