"""The admission pipeline: observe -> decide -> apply -> launch, with per-row leases.

``step(ctx)`` is one pass; a server runs it on a background thread every ``STEP_INTERVAL_S`` and
at once when a submit, cancel or finish in the same process calls ``wake()``; an embedded home
runs it inline after each submit and cancel, when a supervisor finishes and while someone waits,
so nothing has to be started by hand. Any number of processes (server threads, two servers on one
PostgreSQL, CLIs, supervisors) may run it at once:

1. **observe**: ``executor.observe`` the RUNNING jobs this executor launched. A job that
   simply finished is recorded in step 3's transaction (``records.finish_jobs_in``: one write
   for all of them, and the decision sees the capacity they freed; on its own,
   ``records.finish_jobs``, when there is nothing to decide); a preempted one is requeued with
   ``records.requeue_job``; a "lost" job (its supervisor / node is gone) is requeued when it is
   preemptible and has been requeued fewer than ``MAX_PREEMPTIONS`` times, else FAILED with the
   message naming the node (CANCELLED when a cancel was asked for), and what is left of it is
   stopped. Each write is guarded by the attempt it observed, so a stale look never ends a
   later attempt.
2. **relaunch**: a RUNNING job with no executor reference whose launch lease expired (the
   process that admitted it died between its commit and the launch) is launched again, once,
   by whichever process takes over the lease first; if that launch is lost too it FAILS.
3. **decide + apply**, in ONE write transaction under the ``scheduler`` lock (so two processes
   never decide on the same capacity): the finished jobs of step 1 are recorded, then the
   QUEUED and RUNNING rows (their columns, not objects) and the queues become a policy
   ``Snapshot`` (times as epoch seconds, the nodes read from the executor just before), the
   policy (``policy.get_policy("default")``) decides, and the decision is applied: unschedulable
   -> FAILED with the reason; waiting -> the row's message is the reason (written only when it
   changed, one statement for all); preempt -> ``preempt_requested`` and "preempting: ...";
   admit -> RUNNING with its placement, rank 0's GPUs in ``assigned_gpus``, and a launch lease
   (``lock_token`` = this process's token, ``lock_expires_at`` = now + ``LEASE_S``), and - from
   a server - the job's token. Every change gets its audit event, in this transaction.
4. **after the commit**: ``executor.stop(reason="preempt")`` for each victim, and
   ``executor.launch`` for each job this call admitted; ``records.record_launches`` stores the
   references and releases the leases, in batches cut every ``RECORD_EVERY_S``, and a job a
   cancel came for meanwhile is stopped. ``ExecutorUnavailableError`` puts the job back in the
   queue (not an attempt, not a failure) with "waiting: executor unavailable: <reason>".
   A step that admitted jobs while others still wait wakes the pipeline for another at once.

So one step costs a fixed number of transactions - a read of the RUNNING rows, one for the
decision, one per batch of launches - however many jobs it finishes, admits and launches.

A row is only launched by the holder of its unexpired lease, and admitted only under the lock, so
a job is admitted and launched exactly once (``tests/compute/test_two_servers.py`` runs two
server processes on one PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Table, bindparam, select, update
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
# Launched jobs' references are stored in batches, one cut at this age: a launcher that dies
# with launched but unrecorded jobs leaves them to be launched again once their leases expire,
# so the batch of a slow executor (the local one starts a process per job) stays small.
RECORD_EVERY_S = 0.2

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
    orphans, ended = _observe(ctx, executor, result)
    _relaunch_orphans(ctx, executor, orphans, result)
    with ctx.db.read() as s:
        waiting = s.scalar(
            select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value).limit(1)
        )
    infos: list[NodeInfo] | None = None
    unavailable: str | None = None
    if waiting is not None:
        try:
            infos = list(executor.nodes())  # may run NVML or reach Ray: before the transaction
        except ExecutorUnavailableError as exc:
            unavailable = result.unavailable = exc.reason
    if infos is None:  # nothing to decide: the finished jobs on their own
        _finish_all(ctx, ended, result)
        if unavailable is not None:
            _mark_unavailable(ctx, unavailable)
        return result
    launches, stops = _decide_and_apply(ctx, executor, infos, ended, result)
    for job_id, ref, reason in stops:
        stop_job(ctx, executor=executor.name, job_id=job_id, ref=ref, reason="preempt", why=reason)
    _launch_all(ctx, executor, launches, result, token=TOKEN)
    if result.admitted and result.waiting:
        # Jobs still wait and this step admitted others: capacity may have freed meanwhile (or
        # be freed by the next look), so a server's pipeline steps again at once instead of
        # after STEP_INTERVAL_S; a step that admits nothing does not, so an idle or full
        # cluster is not stepped in a loop.
        wake()
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


def _observe(
    ctx: Context, executor: Executor, result: StepResult
) -> tuple[list[str], list[records.Finish]]:
    """Look at the RUNNING jobs this executor launched: a preempted or lost one is recorded
    now; those that simply finished are returned, for the decision's transaction to record
    (one write, and the decision sees the capacity they freed). Also returns the RUNNING jobs
    with no executor reference whose launch lease expired (for ``_relaunch_orphans``: one read
    of the RUNNING rows serves both)."""
    now = utcnow()
    with ctx.db.read() as s:
        rows = s.execute(
            select(
                JobRow.id,
                JobRow.executor_ref,
                JobRow.attempt,
                JobRow.preemptible,
                JobRow.preemptions,
                JobRow.cancel_requested,
                JobRow.lock_expires_at,
            ).where(JobRow.status == JobStatus.RUNNING.value, JobRow.executor == executor.name)
        ).all()
    watched = {
        job_id: _Watched(job_id, dict(ref), attempt, bool(pre), preemptions, bool(cancel))
        for job_id, ref, attempt, pre, preemptions, cancel, _expires in rows
        if ref
    }
    orphans = [
        row[0]
        for row in rows
        if not row[1] and (aware(row[6]) is None or aware(row[6]) < now)  # type: ignore[operator]
    ]
    try:  # also with no jobs: an executor may tidy up (the local one reaps its children)
        seen = executor.observe(ctx, {w.job_id: w.ref for w in watched.values()})
    except ExecutorUnavailableError as exc:
        log.warning("could not observe the running jobs: %s", exc.reason)
        return orphans, []
    ended: list[records.Finish] = []
    for job_id, obs in seen.items():
        job = watched.get(job_id)
        if job is None or obs.state == "running":
            continue
        finish = _plain_finish(job, obs)
        if finish is not None:
            ended.append(finish)
            continue
        try:
            _record_observation(ctx, executor, job, obs, result)
        except Exception:  # one job's trouble must not stop the others'
            log.exception("could not record what became of job %s", job_id)
    return orphans, ended


def _plain_finish(job: _Watched, obs: Observation) -> records.Finish | None:
    """The end of a job that simply finished (the common case, recorded in one batch per
    step); None for a preempted or lost one (requeued or stopped one by one)."""
    if obs.state != "finished" or obs.preempted:
        return None
    status = obs.status or (JobStatus.SUCCEEDED if obs.exit_code == 0 else JobStatus.FAILED)
    if job.cancel_requested and status is JobStatus.FAILED:
        status = JobStatus.CANCELLED
    return records.Finish(
        job_id=job.job_id,
        status=status,
        message=obs.message or f"exited with code {obs.exit_code}",
        exit_code=obs.exit_code,
        usage=obs.usage,
        outputs=obs.outputs,  # None when the executor records them itself (the local one)
        attempt=job.attempt,
    )


def _finish_all(ctx: Context, ended: Sequence[records.Finish], result: StepResult) -> None:
    """Every plainly finished job in one transaction; should that fail, one by one, so one
    job's trouble does not stop the others' (each write is guarded by its attempt, so a
    retry never ends a job twice)."""
    if not ended:
        return
    try:
        result.finished.extend(records.finish_jobs(ctx, ended))
        return
    except Exception:
        log.exception("could not record %d finished jobs together; one by one", len(ended))
    for finish in ended:
        try:
            result.finished.extend(records.finish_jobs(ctx, [finish]))
        except Exception:
            log.exception("could not record what became of job %s", finish.job_id)


def _record_observation(
    ctx: Context, executor: Executor, job: _Watched, obs: Observation, result: StepResult
) -> None:
    """A preempted or lost job (a plain finish goes through ``_finish_all``)."""
    if obs.state == "finished":
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


def _relaunch_orphans(
    ctx: Context, executor: Executor, expired: Sequence[str], result: StepResult
) -> None:
    """RUNNING jobs with no executor reference whose launch lease expired (see step 2)."""
    for job_id in expired:
        launch, token = _take_over(ctx, job_id)
        if launch is not None:
            _launch_all(ctx, executor, [launch], result, token=token)


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


# What the policy's snapshot needs of every QUEUED and RUNNING row, read as plain columns: with
# a thousand jobs queued, loading each as an ORM object (and decoding all its JSON) every step
# cost more than the decision. The rows a decision changes are then loaded as objects.
_SNAPSHOT_COLUMNS = (
    JobRow.id,
    JobRow.status,
    JobRow.spec,
    JobRow.queue,
    JobRow.workers,
    JobRow.priority,
    JobRow.created_at,
    JobRow.preemptible,
    JobRow.preemptions,
    JobRow.attained_gpu_s,
    JobRow.started_at,
    JobRow.placement,
    JobRow.assigned_gpus,
    JobRow.gpu_units,
    JobRow.cancel_requested,
    JobRow.preempt_requested,
    JobRow.message,
)


def _decide_and_apply(
    ctx: Context,
    executor: Executor,
    infos: Sequence[NodeInfo],
    ended: Sequence[records.Finish],
    result: StepResult,
) -> tuple[list[Launch], list[tuple[str, dict[str, Any], str]]]:
    """Step 3 in one transaction, with the jobs the look found finished (``ended``) recorded
    first; should that transaction fail while it holds finished jobs, they are recorded on
    their own (so one bad row does not hold up the others' ends) and the decision is tried
    again without them."""
    try:
        return _decide_once(ctx, executor, infos, ended, result)
    except Exception:
        if not ended:
            raise
        log.exception("deciding with %d finished jobs failed; recording them apart", len(ended))
    _finish_all(ctx, ended, result)
    return _decide_once(ctx, executor, infos, (), result)


def _decide_once(
    ctx: Context,
    executor: Executor,
    infos: Sequence[NodeInfo],
    ended: Sequence[records.Finish],
    result: StepResult,
) -> tuple[list[Launch], list[tuple[str, dict[str, Any], str]]]:
    nodes = [info.node for info in infos]
    launches: list[Launch] = []
    stops: list[tuple[str, dict[str, Any], str]] = []
    done = StepResult()  # merged into result once committed: a rolled-back try leaves no trace
    with ctx.db.transaction() as s:
        lock(s, "scheduler")  # before any row: cancel_job takes it first too
        done.finished.extend(records.finish_jobs_in(s, ctx.actor, ended))
        rows = s.execute(
            select(*_SNAPSHOT_COLUMNS).where(
                JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
            )
        ).all()
        snapshot = _snapshot(s, rows, nodes)
        if snapshot.pending:
            decision = _policy().decide(snapshot)
            _write_waiting(s, decision, {r.id: r for r in rows}, done)
            touched = [
                *decision.unschedulable,
                *(p.job_id for p in decision.preempt),
                *(p.job_id for p in decision.admit),
            ]
            by_id = _load_rows(s, touched)
            projects = project_names(s)
            _apply(ctx, s, decision, by_id, projects, executor, launches, stops, done)
            launches = _with_tokens_in(s, ctx, launches)
    result.finished.extend(done.finished)
    result.admitted.extend(done.admitted)
    result.preempting.extend(done.preempting)
    result.waiting = done.waiting
    return launches, stops


def _with_tokens_in(s: Session, ctx: Context, launches: Sequence[Launch]) -> list[Launch]:
    """The admitted jobs' tokens, issued in the decision's transaction (a server's; an
    embedded home hands out none). A job left without one (its project refused the pipeline's
    actor) gets it, or fails, at its launch."""
    if ctx.settings.server_url is None or not launches:
        return list(launches)
    tokens = records.issue_tokens_in(
        s, ctx, [(la.job_id, la.project, la.run_id) for la in launches if la.token is None]
    )
    return [
        dataclasses.replace(la, token=tokens[la.job_id]) if la.job_id in tokens else la
        for la in launches
    ]


def _load_rows(s: Session, job_ids: Sequence[str]) -> dict[str, JobRow]:
    """The rows a decision changes, as objects (locked on PostgreSQL; SQLite's write
    transaction holds the whole database)."""
    found: dict[str, JobRow] = {}
    ids = list(dict.fromkeys(job_ids))
    for i in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
        query = select(JobRow).where(JobRow.id.in_(ids[i : i + 500])).with_for_update()
        found.update({row.id: row for row in s.scalars(query)})
    return found


def _write_waiting(
    s: Session, decision: Decision, seen: Mapping[str, Any], result: StepResult
) -> None:
    """Each waiting job's reason, written only when it changed (no write per job per step), in
    one statement: a queue position changes for every job behind each admitted one."""
    changed = [
        {"b_id": job_id, "b_message": reason}
        for job_id, reason in decision.waiting.items()
        if job_id in seen
        and seen[job_id].status == JobStatus.QUEUED.value
        and seen[job_id].message != reason
    ]
    result.waiting = len(decision.waiting)
    if not changed:
        return
    table = JobRow.__table__
    assert isinstance(table, Table)
    s.connection().execute(
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.status == JobStatus.QUEUED.value)
        .values(message=bindparam("b_message")),
        changed,
    )


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


def _snapshot(s: Session, rows: Sequence[Any], nodes: Sequence[Node]) -> Snapshot:
    """The policy's view: ``rows`` hold ``_SNAPSHOT_COLUMNS`` (or are JobRows)."""
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


def _placement_of(row: Any, default_node: str) -> Placement:
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


def _launch_all(
    ctx: Context, executor: Executor, launches: Sequence[Launch], result: StepResult, *, token: str
) -> None:
    """Launch what this step admitted (or took over): the job tokens the decision did not
    issue in one transaction, each launch, and the references stored in batches
    (``records.record_launches``), cut every ``RECORD_EVERY_S`` so a slow executor's launches
    do not sit unrecorded (see there)."""
    if not launches:
        return
    tokens = _issue_tokens(ctx, launches)  # those the decision's transaction did not issue
    pending: dict[str, dict[str, Any]] = {}
    opened = 0.0
    for launch in launches:
        if ctx.settings.server_url is not None and launch.token is None:
            found = tokens.get(launch.job_id)
            try:
                launch = _with_token(ctx, launch, found)
            except Exception:  # left under its lease: relaunched once when the lease expires
                log.exception("could not issue the token of job %s", launch.job_id)
                continue
        ref = _launch_one(ctx, executor, launch, result, token=token)
        if ref is None:
            continue
        if not pending:
            opened = time.monotonic()
        pending[launch.job_id] = ref
        if time.monotonic() - opened >= RECORD_EVERY_S:
            _record_launches(ctx, executor, pending, result, token=token)
            pending = {}
    _record_launches(ctx, executor, pending, result, token=token)


def _issue_tokens(ctx: Context, launches: Sequence[Launch]) -> dict[str, str]:
    """The job tokens a server hands the jobs it launches, in one transaction; {} when this
    process is no server, or when that transaction failed (then each is issued on its own)."""
    wanted = [(la.job_id, la.project, la.run_id) for la in launches if la.token is None]
    if ctx.settings.server_url is None or not wanted:
        return {}
    try:
        return records.issue_tokens(ctx, wanted)
    except Exception:
        log.exception("could not issue %d job tokens together; one by one", len(wanted))
        return {}


def _launch_one(
    ctx: Context, executor: Executor, launch: Launch, result: StepResult, *, token: str
) -> dict[str, Any] | None:
    """``executor.launch``; its reference, or None when the job went back to the queue (the
    executor is unavailable for now) or FAILED (it could not be launched)."""
    job_id = launch.job_id
    try:
        return dict(executor.launch(ctx, launch))
    except ExecutorUnavailableError as exc:
        _unlaunch(ctx, job_id, token=token, message=f"waiting: executor unavailable: {exc.reason}")
        result.unavailable = exc.reason
        return None
    except ShipyardError as exc:
        message = f"could not launch: {exc.message}"
    except Exception as exc:
        log.exception("launching job %s failed", job_id)
        message = f"could not launch: {exc!r}"
    if records.finish_job(
        ctx, job_id=job_id, status=JobStatus.FAILED, message=message, attempt=launch.attempt
    ):
        result.finished.append(job_id)
    return None


def _record_launches(
    ctx: Context,
    executor: Executor,
    refs: Mapping[str, Mapping[str, Any]],
    result: StepResult,
    *,
    token: str,
) -> None:
    """Store the references and release the leases (one transaction), then stop each job a
    cancel came for while it was being launched (that cancel had no reference to stop)."""
    if not refs:
        return
    recorded, cancelled = records.record_launches(ctx, refs, token=token)
    result.launched.extend(recorded)
    for job_id in cancelled:
        stop_job(ctx, executor=executor.name, job_id=job_id, ref=refs[job_id], reason="cancel")


def _with_token(ctx: Context, launch: Launch, token: str | None = None) -> Launch:
    """The launch with its job token (``token`` when issued already, else issued now)."""
    if token is None:
        token = records.issue_token(
            ctx, job_id=launch.job_id, project=launch.project, run_id=launch.run_id
        )
    return dataclasses.replace(launch, token=token)


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
