"""The admission pipeline: observe -> decide -> apply -> launch, with per-row leases.

``step(ctx)`` is one pass; a server runs it on a background thread every ``STEP_INTERVAL_S`` and
at once when a submit, cancel or finish in the same process calls ``wake()``; an embedded home
runs it inline after each submit and cancel, when a supervisor finishes and while someone waits,
so nothing has to be started by hand. Any number of processes (server threads, two servers on one
PostgreSQL, CLIs, supervisors) may run it at once:

1. **observe**: ``executor.observe`` the RUNNING jobs this executor launched. A finished outcome
   is recorded (``records.finish_job``; a preempted one is requeued with ``records.requeue_job``);
   a "lost" job (its supervisor / node is gone) is requeued when it is preemptible and has been
   requeued fewer than ``MAX_PREEMPTIONS`` times, else FAILED with the message naming the node
   (CANCELLED when a cancel was asked for), and what is left of it is stopped. Each write is
   guarded by the attempt it observed, so a stale look never ends a later attempt.
2. **relaunch**: a RUNNING job with no executor reference whose launch lease expired (the
   process that admitted it died between its commit and the launch) is launched again, once,
   by whichever process takes over the lease first; if that launch is lost too it FAILS.
3. **decide + apply**, in ONE write transaction under the ``scheduler`` lock (so two processes
   never decide on the same capacity): the QUEUED and RUNNING rows and the queues become a policy
   ``Snapshot`` (times as epoch seconds, the nodes read from the executor just before), the
   policy (``policy.get_policy("default")``) decides, and the decision is applied: unschedulable
   -> FAILED with the reason; waiting -> the row's message is the reason (written only when it
   changed); preempt -> ``preempt_requested`` and "preempting: ..."; admit -> RUNNING with its
   placement, rank 0's GPUs in ``assigned_gpus``, and a launch lease (``lock_token`` = this
   process's token, ``lock_expires_at`` = now + ``LEASE_S``).
4. **after the commit**: ``executor.stop(reason="preempt")`` for each victim, and
   ``executor.launch`` for each job this call admitted; ``records.record_launch`` stores the
   reference and releases the lease. ``ExecutorUnavailableError`` puts the job back in the queue
   (not an attempt, not a failure) with "waiting: executor unavailable: <reason>".

A row is only launched by the holder of its unexpired lease, and admitted only under the lock, so
a job is admitted and launched exactly once (``tests/compute/test_two_servers.py`` runs two
server processes on one PostgreSQL).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard import wiring
from shipyard.compute import queues, records
from shipyard.compute.executors.base import (
    Executor,
    ExecutorUnavailableError,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy import get_policy
from shipyard.compute.policy.base import (
    MAX_PREEMPTIONS,
    Decision,
    Demand,
    Node,
    PendingJob,
    Placement,
    Policy,
    RunningJob,
    Snapshot,
    WorkerPlacement,
)
from shipyard.compute.policy.placement import never_fits as _placement_never_fits
from shipyard.context import Context
from shipyard.domain.jobs import check_transition
from shipyard.domain.models import JobSpec, JobStatus
from shipyard.errors import ShipyardError
from shipyard.security import audit
from shipyard.store.engine import lock
from shipyard.store.queries import project_names
from shipyard.store.tables import JobRow, aware, utcnow

log = logging.getLogger("shipyard.compute.admission")

STEP_INTERVAL_S = 0.5
# How long a process that admitted a job has to launch it before another process may.
LEASE_S = 60.0
# Grace between SIGTERM and SIGKILL for a cancel and for what is left of a lost job.
STOP_GRACE_S = 5.0
POLICY = "default"
# Leases taken over from a launcher that died carry this prefix: lost again, the job fails.
_RELAUNCH = "r:"

# This process's lease token.
TOKEN = uuid.uuid4().hex
# Set by submit / cancel / finish in a server process: its background thread steps at once.
WAKE = threading.Event()
_background = 0
_background_lock = threading.Lock()


@dataclass(slots=True)
class StepResult:
    """What one step did (job ids)."""

    admitted: list[str] = field(default_factory=list)
    launched: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    preempting: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    waiting: int = 0
    unavailable: str | None = None  # why the executor could not be reached, when it could not


def wake() -> None:
    """Ask this process's background pipeline (a server's) to step now."""
    WAKE.set()


def background(running: bool) -> None:
    """A server's background pipeline starts (True) or stops (False) in this process."""
    global _background
    with _background_lock:
        _background += 1 if running else -1


def in_background() -> bool:
    """Whether a background pipeline runs in this process (else submit steps inline)."""
    return _background > 0


def step(ctx: Context) -> StepResult:
    """One pass of the pipeline (see the module docstring)."""
    result = StepResult()
    executor = wiring.open_executor(ctx.settings.executor, ctx.settings)
    _observe(ctx, executor, result)
    _relaunch_orphans(ctx, executor, result)
    with ctx.db.read() as s:
        waiting = s.scalar(
            select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value).limit(1)
        )
    if waiting is None:
        return result
    try:
        infos = executor.nodes()  # may run NVML or reach Ray: before the transaction
    except ExecutorUnavailableError as exc:
        result.unavailable = exc.reason
        _mark_unavailable(ctx, exc.reason)
        return result
    launches, stops = _decide_and_apply(ctx, executor, infos, result)
    for job_id, ref, reason in stops:
        stop_job(ctx, executor=executor.name, job_id=job_id, ref=ref, reason="preempt", why=reason)
    for launch in launches:
        _launch(ctx, executor, launch, result, token=TOKEN)
    return result


def stop_job(
    ctx: Context,
    *,
    executor: str,
    job_id: str,
    ref: Mapping[str, Any],
    reason: StopReason,
    why: str = "",
) -> None:
    """Tell the job's executor to stop it (after the flag that says why is committed)."""
    grace = ctx.settings.preempt_grace_s if reason == "preempt" else STOP_GRACE_S
    try:
        runner = _executor_named(ctx, executor)
        runner.stop(ctx, job_id, ref, reason=reason, grace_s=grace)
    except ExecutorUnavailableError as exc:  # its flag is set: a later look finishes the job
        log.warning("could not tell the executor to stop job %s (%s): %s", job_id, why, exc)


def never_fits(nodes: Sequence[Node], spec: JobSpec) -> str | None:
    """Why no node of the cluster could ever hold one worker of ``spec`` (naming the largest
    node), or None when one could."""
    return _placement_never_fits(nodes, _pending_of(spec), "nodes")


def policy() -> Policy:
    """The admission policy (shipyard's default)."""
    return _policy()


# --- observe ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Watched:
    job_id: str
    ref: dict[str, Any]
    attempt: int
    preemptible: bool
    preemptions: int
    cancel_requested: bool


def _observe(ctx: Context, executor: Executor, result: StepResult) -> None:
    with ctx.db.read() as s:
        rows = s.execute(
            select(
                JobRow.id,
                JobRow.executor_ref,
                JobRow.attempt,
                JobRow.preemptible,
                JobRow.preemptions,
                JobRow.cancel_requested,
            ).where(JobRow.status == JobStatus.RUNNING.value, JobRow.executor == executor.name)
        ).all()
    watched = {
        job_id: _Watched(job_id, dict(ref), attempt, bool(pre), preemptions, bool(cancel))
        for job_id, ref, attempt, pre, preemptions, cancel in rows
        if ref
    }
    try:  # also with no jobs: an executor may tidy up (the local one reaps its children)
        seen = executor.observe(ctx, {w.job_id: w.ref for w in watched.values()})
    except ExecutorUnavailableError as exc:
        log.warning("could not observe the running jobs: %s", exc.reason)
        return
    for job_id, obs in seen.items():
        job = watched.get(job_id)
        if job is None or obs.state == "running":
            continue
        try:
            _record_observation(ctx, executor, job, obs, result)
        except Exception:  # one job's trouble must not stop the others'
            log.exception("could not record what became of job %s", job_id)


def _record_observation(
    ctx: Context, executor: Executor, job: _Watched, obs: Observation, result: StepResult
) -> None:
    if obs.state == "finished":
        if obs.preempted:
            if records.requeue_job(
                ctx,
                job_id=job.job_id,
                message=obs.message or "preempted",
                preempted=True,
                attempt=job.attempt,
                usage=obs.usage,
            ):
                result.requeued.append(job.job_id)
            return
        status = obs.status or (JobStatus.SUCCEEDED if obs.exit_code == 0 else JobStatus.FAILED)
        if job.cancel_requested and status is JobStatus.FAILED:
            status = JobStatus.CANCELLED
        if records.finish_job(
            ctx,
            job_id=job.job_id,
            status=status,
            message=obs.message or f"exited with code {obs.exit_code}",
            exit_code=obs.exit_code,
            usage=obs.usage,
            attempt=job.attempt,
        ):
            result.finished.append(job.job_id)
        return
    # lost: its node or supervisor is gone. What is left of it is stopped first, while the row
    # still shows this attempt (stopped after a requeue, it could hit the next attempt).
    if not _still(ctx, job):
        return
    executor.stop(ctx, job.job_id, job.ref, reason="lost", grace_s=STOP_GRACE_S)
    where = f" (node {obs.node_id})" if obs.node_id and obs.node_id not in obs.message else ""
    message = (obs.message or "lost by its executor") + where
    if job.preemptible and not job.cancel_requested and job.attempt <= MAX_PREEMPTIONS:
        outcome = records.requeue_job(
            ctx, job_id=job.job_id, message=message, preempted=False, attempt=job.attempt
        )
        if outcome is JobStatus.QUEUED:
            result.requeued.append(job.job_id)
    else:
        status = JobStatus.CANCELLED if job.cancel_requested else JobStatus.FAILED
        if records.finish_job(
            ctx,
            job_id=job.job_id,
            status=status,
            message=message,
            usage=obs.usage,
            attempt=job.attempt,
        ):
            result.finished.append(job.job_id)


def _still(ctx: Context, job: _Watched) -> bool:
    """Whether the job is still RUNNING the attempt (and executor reference) we observed."""
    with ctx.db.read() as s:
        found = s.execute(
            select(JobRow.status, JobRow.attempt, JobRow.executor_ref).where(
                JobRow.id == job.job_id
            )
        ).first()
    return (
        found is not None
        and found[0] == JobStatus.RUNNING.value
        and found[1] == job.attempt
        and dict(found[2] or {}) == job.ref
    )


# --- relaunch -----------------------------------------------------------------------------------


def _relaunch_orphans(ctx: Context, executor: Executor, result: StepResult) -> None:
    """RUNNING jobs with no executor reference whose launch lease expired (see step 2)."""
    now = utcnow()
    with ctx.db.read() as s:
        candidates = s.execute(
            select(JobRow.id, JobRow.executor_ref, JobRow.lock_expires_at).where(
                JobRow.status == JobStatus.RUNNING.value, JobRow.executor == executor.name
            )
        ).all()
    expired = [
        job_id
        for job_id, ref, expires in candidates
        if not ref and (aware(expires) is None or aware(expires) < now)  # type: ignore[operator]
    ]
    for job_id in expired:
        launch, token = _take_over(ctx, job_id)
        if launch is not None:
            _launch(ctx, executor, launch, result, token=token)


def _take_over(ctx: Context, job_id: str) -> tuple[Launch | None, str]:
    now = utcnow()
    token = _RELAUNCH + TOKEN
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        expires = aware(row.lock_expires_at) if row is not None else None
        if (
            row is None
            or row.status != JobStatus.RUNNING.value
            or row.executor_ref
            or (expires is not None and expires >= now)
        ):
            return None, token  # launched, finished or taken meanwhile
        projects = project_names(s)
        if (row.lock_token or "").startswith(_RELAUNCH):
            message = (
                "lost before it started: the processes that admitted it and that relaunched it "
                f"both stopped before launching it (within {LEASE_S:g}s each); submit it again"
            )
            target = JobStatus.CANCELLED if row.cancel_requested else JobStatus.FAILED
            records.finish_row(s, row, target, message=message)
            audit.record(
                s,
                actor=ctx.actor,
                action="job.finish",
                resource=records.resource(projects[row.project_id], row.id),
                details={"status": target.value, "message": message},
            )
            return None, token
        row.lock_token = token
        row.lock_expires_at = now + timedelta(seconds=LEASE_S)
        launch = _launch_of(row, projects[row.project_id], ctx)
    return launch, token


# --- decide + apply -----------------------------------------------------------------------------


def _decide_and_apply(
    ctx: Context, executor: Executor, infos: Sequence[NodeInfo], result: StepResult
) -> tuple[list[Launch], list[tuple[str, dict[str, Any], str]]]:
    nodes = [info.node for info in infos]
    launches: list[Launch] = []
    stops: list[tuple[str, dict[str, Any], str]] = []
    with ctx.db.transaction() as s:
        lock(s, "scheduler")
        rows = s.scalars(
            select(JobRow).where(
                JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
            )
        ).all()
        snapshot = _snapshot(s, rows, nodes)
        if not snapshot.pending:
            return [], []
        decision = _policy().decide(snapshot)
        by_id = {r.id: r for r in rows}
        projects = project_names(s)
        _apply(ctx, s, decision, by_id, projects, executor, launches, stops, result)
    return launches, stops


def _apply(
    ctx: Context,
    s: Session,
    decision: Decision,
    by_id: Mapping[str, JobRow],
    projects: Mapping[str, str],
    executor: Executor,
    launches: list[Launch],
    stops: list[tuple[str, dict[str, Any], str]],
    result: StepResult,
) -> None:
    for job_id, reason in decision.unschedulable.items():
        row = by_id.get(job_id)
        if row is None or row.status != JobStatus.QUEUED.value:
            continue
        message = f"unschedulable: {reason}"
        records.finish_row(s, row, JobStatus.FAILED, message=message)
        audit.record(
            s,
            actor=ctx.actor,
            action="job.finish",
            resource=records.resource(projects[row.project_id], row.id),
            details={"status": JobStatus.FAILED.value, "message": message},
        )
        result.finished.append(job_id)
    for job_id, reason in decision.waiting.items():
        row = by_id.get(job_id)
        if row is not None and row.status == JobStatus.QUEUED.value and row.message != reason:
            row.message = reason  # only when it changed: no write per job per step
    result.waiting = len(decision.waiting)
    for preemption in decision.preempt:
        row = by_id.get(preemption.job_id)
        if (
            row is None
            or row.status != JobStatus.RUNNING.value
            or row.preempt_requested
            or row.cancel_requested
            or not row.executor_ref  # still being launched: a later decision may pick it
        ):
            continue
        row.preempt_requested = True
        row.message = f"preempting: {preemption.reason}"
        audit.record(
            s,
            actor=ctx.actor,
            action="job.preempt",
            resource=records.resource(projects[row.project_id], row.id),
            details={"for_job": preemption.for_job, "reason": preemption.reason},
        )
        stops.append((row.id, dict(row.executor_ref or {}), preemption.reason))
        result.preempting.append(row.id)
    now = utcnow()
    for placement in decision.admit:
        row = by_id.get(placement.job_id)
        if row is None or row.status != JobStatus.QUEUED.value:
            continue
        check_transition(JobStatus(row.status), JobStatus.RUNNING, job_id=row.id)
        workers = [
            {"node_id": w.node_id, "gpus": list(w.gpus), "gpu_share": w.gpu_share}
            for w in placement.workers
        ]
        row.status = JobStatus.RUNNING.value
        row.placement = workers
        row.assigned_gpus = list(placement.workers[0].gpus) if placement.workers else []
        row.started_at = now
        row.finished_at = None
        row.executor = executor.name
        row.executor_ref = None
        row.message = ""
        row.lock_token = TOKEN
        row.lock_expires_at = now + timedelta(seconds=LEASE_S)
        project = projects[row.project_id]
        audit.record(
            s,
            actor=ctx.actor,
            action="job.start",
            resource=records.resource(project, row.id),
            details={
                "gpus": row.assigned_gpus,
                "placement": workers,
                "attempt": row.attempt,
                "executor": executor.name,
            },
        )
        launches.append(_launch_of(row, project, ctx))
        result.admitted.append(row.id)


def _snapshot(s: Session, rows: Sequence[JobRow], nodes: Sequence[Node]) -> Snapshot:
    now = time.time()
    pending: list[PendingJob] = []
    running: list[RunningJob] = []
    default_node = nodes[0].id if nodes else ""
    for row in rows:
        spec = row.spec or {}
        demand = _demand(spec)
        submitted = (aware(row.created_at) or utcnow()).timestamp()
        max_runtime = spec.get("max_runtime_s")
        common: dict[str, Any] = {
            "id": row.id,
            "queue": row.queue,
            "demand": demand,
            "workers": row.workers or 1,
            "priority": row.priority or 0,
            "submitted_at": submitted,
            "max_runtime_s": float(max_runtime) if max_runtime is not None else None,
            "preemptible": bool(row.preemptible),
            "preemptions": row.preemptions or 0,
        }
        if row.status == JobStatus.QUEUED.value:
            pending.append(PendingJob(**common, attained_gpu_s=row.attained_gpu_s or 0.0))
            continue
        started = aware(row.started_at)
        placement = _placement_of(row, default_node)
        running.append(
            RunningJob(
                **common,
                placement=placement,
                started_at=started.timestamp() if started is not None else now,
                attained_gpu_s=(row.attained_gpu_s or 0.0)
                + records.attempt_gpu_seconds(row, utcnow()),
                stopping=bool(row.cancel_requested or row.preempt_requested),
            )
        )
    return Snapshot(
        now=now, nodes=nodes, queues=queues.load_configs(s), pending=pending, running=running
    )


def _demand(spec: Mapping[str, Any]) -> Demand:
    res = spec.get("resources") or {}
    return Demand(
        cpus=float(res.get("cpus", 1.0)),
        memory_mb=int(res.get("memory_mb", 512)),
        gpus=int(res.get("gpus", 0)),
        gpu_fraction=float(res.get("gpu_fraction") or 0.0),
        gpu_memory_mb=int(res.get("gpu_memory_mb") or 0),
        gpu_type=res.get("gpu_type"),
    )


def _pending_of(spec: JobSpec) -> PendingJob:
    return PendingJob(
        id="new",
        queue=spec.queue or "",
        demand=_demand(spec.model_dump(mode="json")),
        workers=spec.workers,
        priority=spec.priority,
        preemptible=spec.preemptible,
    )


def _placement_of(row: JobRow, default_node: str) -> Placement:
    workers = tuple(
        WorkerPlacement(
            node_id=str(w.get("node_id", default_node)),
            gpus=tuple(int(g) for g in w.get("gpus") or ()),
            gpu_share=float(w.get("gpu_share") or 0.0),
        )
        for w in row.placement or ()
        if isinstance(w, Mapping)
    )
    if not workers:  # a job admitted before placements were stored: rank 0's GPUs, one node
        workers = (
            WorkerPlacement(
                node_id=default_node, gpus=tuple(int(g) for g in row.assigned_gpus or ())
            ),
        )
    return Placement(job_id=row.id, workers=workers)


def _launch_of(row: JobRow, project: str, ctx: Context) -> Launch:
    return Launch(
        job_id=row.id,
        project=project,
        attempt=row.attempt or 1,
        spec=JobSpec.model_validate(row.spec),
        placement=_placement_of(row, ""),
        code_digest=row.code_digest,
        run_id=row.run_id,
        server_url=ctx.settings.server_url,
    )


# --- launch -------------------------------------------------------------------------------------


def _launch(
    ctx: Context, executor: Executor, launch: Launch, result: StepResult, *, token: str
) -> None:
    job_id = launch.job_id
    if ctx.settings.server_url is not None and launch.token is None:
        launch = _with_token(ctx, launch)
    try:
        ref = executor.launch(ctx, launch)
    except ExecutorUnavailableError as exc:
        _unlaunch(ctx, job_id, token=token, message=f"waiting: executor unavailable: {exc.reason}")
        result.unavailable = exc.reason
        return
    except ShipyardError as exc:
        records.finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.FAILED,
            message=f"could not launch: {exc.message}",
            attempt=launch.attempt,
        )
        result.finished.append(job_id)
        return
    except Exception as exc:
        log.exception("launching job %s failed", job_id)
        records.finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.FAILED,
            message=f"could not launch: {exc!r}",
            attempt=launch.attempt,
        )
        result.finished.append(job_id)
        return
    if records.record_launch(ctx, job_id=job_id, ref=ref, token=token):
        result.launched.append(job_id)
    with ctx.db.read() as s:  # a cancel that came while it was being launched had no ref to stop
        cancelled = s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
    if cancelled:
        stop_job(ctx, executor=executor.name, job_id=job_id, ref=ref, reason="cancel")


def _with_token(ctx: Context, launch: Launch) -> Launch:
    token = records.issue_token(
        ctx, job_id=launch.job_id, project=launch.project, run_id=launch.run_id
    )
    return Launch(
        job_id=launch.job_id,
        project=launch.project,
        attempt=launch.attempt,
        spec=launch.spec,
        placement=launch.placement,
        code_digest=launch.code_digest,
        run_id=launch.run_id,
        server_url=launch.server_url,
        token=token,
    )


def _unlaunch(ctx: Context, job_id: str, *, token: str, message: str) -> None:
    """Back to the queue after the executor refused the launch for now (not a new attempt)."""
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.status != JobStatus.RUNNING.value or row.lock_token != token:
            return
        if row.cancel_requested:
            records.finish_row(s, row, JobStatus.CANCELLED, message="cancelled before it started")
            return
        check_transition(JobStatus(row.status), JobStatus.QUEUED, job_id=row.id)
        row.status = JobStatus.QUEUED.value
        row.message = message
        row.placement = []
        row.assigned_gpus = []
        row.started_at = None
        row.lock_token = None
        row.lock_expires_at = None
    records.revoke_token(ctx, job_id=job_id)


def _mark_unavailable(ctx: Context, reason: str) -> None:
    """Every queued job says why it waits (only rows whose message changes are written)."""
    message = f"waiting: executor unavailable: {reason}"
    with ctx.db.transaction() as s:
        rows = s.scalars(
            select(JobRow).where(JobRow.status == JobStatus.QUEUED.value, JobRow.message != message)
        ).all()
        for row in rows:
            row.message = message


# --- helpers ------------------------------------------------------------------------------------


_policies: dict[str, Policy] = {}


def _policy() -> Policy:
    found = _policies.get(POLICY)
    if found is None:
        found = _policies[POLICY] = get_policy(POLICY)
    return found


def _executor_named(ctx: Context, name: str) -> Executor:
    """The executor that runs a job (its row's ``executor``): ours, or the configured one."""
    configured = wiring.open_executor(ctx.settings.executor, ctx.settings)
    if configured.name == name:
        return configured
    return wiring.open_executor(name, ctx.settings)


__all__ = [
    "LEASE_S",
    "STEP_INTERVAL_S",
    "STOP_GRACE_S",
    "TOKEN",
    "WAKE",
    "StepResult",
    "background",
    "in_background",
    "never_fits",
    "policy",
    "step",
    "stop_job",
    "wake",
]
