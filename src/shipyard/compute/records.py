"""Job rows: row <-> domain, the guarded status changes, and where a job's files live.

Every change of a job's status goes through here (``finish_job``, ``requeue_job``, and the
admission pipeline's ``finish_row``), checked against the state machine in ``domain.jobs``; the
service (``compute.jobs``), the pipeline (``compute.admission``) and the executors' own processes
(the local supervisor) all call these, never write ``status`` themselves. The pipeline's
batches (``finish_jobs`` / ``finish_jobs_in``, ``record_launches``, ``issue_tokens_in``) guard
each row exactly as the one-job calls do, and write the same audit events, in one transaction.

A job's folder is ``$SHIPYARD_HOME/jobs/<id>``; its combined log (every rank, every attempt) is
``output.log`` there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.jobs import check_transition
from shipyard.domain.models import Job, JobSpec, JobStatus, JobUsage, RunStatus
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, NotFoundError, ShipyardError
from shipyard.security import audit, principals
from shipyard.security.rbac import authorize
from shipyard.store.tables import JobRow, ProjectRow, RunRow, aware, utcnow

LOG_FILE = "output.log"
SUPERVISOR_LOG_FILE = "supervisor.log"


def log_path(ctx: Context, job_id: str) -> Path:
    return job_dir(ctx, job_id) / LOG_FILE


def job_dir(ctx: Context, job_id: str) -> Path:
    validate_name(job_id, field="job_id")
    return ctx.settings.jobs_dir / job_id


@dataclass(frozen=True, slots=True)
class Finish:
    """One job's end, as ``finish_job`` takes it (``finish_jobs`` takes many)."""

    job_id: str
    status: JobStatus
    message: str
    exit_code: int | None = None
    usage: JobUsage | None = None
    outputs: list[str] | None = None
    attempt: int | None = None


def finish_job(
    ctx: Context,
    *,
    job_id: str,
    status: JobStatus,
    message: str,
    exit_code: int | None = None,
    usage: JobUsage | None = None,
    outputs: list[str] | None = None,
    attempt: int | None = None,
) -> bool:
    """Record a job's end; False when it had already ended (or ``attempt`` is not its current
    attempt: an outcome of an earlier attempt never ends a later one)."""
    outcome = Finish(job_id, status, message, exit_code, usage, outputs, attempt)
    with ctx.db.transaction() as s:
        row, project = row_with_project(s, job_id, for_update=True)
        if not _finish_in(s, ctx.actor, row, project, outcome):
            return False
    revoke_token(ctx, job_id=job_id)
    return True


def finish_jobs(ctx: Context, outcomes: Sequence[Finish]) -> list[str]:
    """``finish_job`` for many jobs in ONE transaction (the pipeline's observe: every job one
    look found finished): the ids that ended now. Each is guarded as ``finish_job`` guards it
    (already ended, or an outcome of an earlier attempt: skipped), each gets its
    ``job.finish`` event, and the jobs' tokens are revoked in the same transaction. A job that
    no longer exists is skipped."""
    if not outcomes:
        return []
    with ctx.db.transaction() as s:
        return finish_jobs_in(s, ctx.actor, outcomes)


def finish_jobs_in(s: Session, actor: str, outcomes: Sequence[Finish]) -> list[str]:
    """``finish_jobs`` inside the caller's write transaction (the admission pipeline records
    them in the transaction of its decision, which then sees the capacity they freed)."""
    ended: list[str] = []
    if not outcomes:
        return ended
    found = rows_with_projects(s, [o.job_id for o in outcomes], for_update=True)
    # their runs, read together: finish_row's look-up of each is then no query (nor a flush of
    # everything pending before it); held here, as the session holds them weakly
    runs = _load_runs(s, [row.run_id for row, _project in found.values() if row.run_id])
    for outcome in outcomes:
        pair = found.get(outcome.job_id)
        if pair is not None and _finish_in(s, actor, pair[0], pair[1], outcome):
            ended.append(outcome.job_id)
    principals.revoke_job_tokens_in(s, actor=actor, job_ids=ended)
    del runs
    return ended


def _load_runs(s: Session, run_ids: Sequence[str]) -> list[RunRow]:
    return [
        run
        for chunk in _chunks(list(dict.fromkeys(run_ids)))
        for run in s.scalars(select(RunRow).where(RunRow.id.in_(chunk)))
    ]


def _finish_in(s: Session, actor: str, row: JobRow, project: str, outcome: Finish) -> bool:
    if JobStatus(row.status).finished:
        return False
    if outcome.attempt is not None and row.attempt != outcome.attempt:
        return False
    finish_row(
        s,
        row,
        outcome.status,
        message=outcome.message,
        exit_code=outcome.exit_code,
        usage=outcome.usage,
        outputs=outcome.outputs,
    )
    audit.record(
        s,
        actor=actor,
        action="job.finish",
        resource=resource(project, row.id),
        details={
            "status": outcome.status.value,
            "exit_code": outcome.exit_code,
            "message": outcome.message[:500],
        },
    )
    return True


def requeue_job(
    ctx: Context,
    *,
    job_id: str,
    message: str,
    preempted: bool,
    attempt: int | None = None,
    usage: JobUsage | None = None,
) -> JobStatus | None:
    """Put a RUNNING job back in the queue for its next attempt (after a preemption, or a lost
    node of a preemptible job); the job's status afterwards, None when it was not RUNNING (or
    ``attempt`` is not its current attempt).

    The attempt counter goes up (and ``preemptions`` when ``preempted``), the GPU-seconds of this
    attempt are added to ``attained_gpu_s``, its placement and executor reference are cleared and
    its run stays RUNNING, so the next attempt attaches to the same run. A job that was asked to
    cancel meanwhile is CANCELLED instead: a cancel always wins over a requeue.
    """
    with ctx.db.transaction() as s:
        row, project = row_with_project(s, job_id, for_update=True)
        if row.status != JobStatus.RUNNING.value:
            return None
        if attempt is not None and row.attempt != attempt:
            return None
        if row.cancel_requested:
            text = f"cancelled while it was being stopped ({message})"
            finish_row(s, row, JobStatus.CANCELLED, message=text, usage=usage)
            audit.record(
                s,
                actor=ctx.actor,
                action="job.finish",
                resource=resource(project, job_id),
                details={"status": JobStatus.CANCELLED.value, "message": text[:500]},
            )
            status = JobStatus.CANCELLED
        else:
            requeue_row(s, row, message=message, preempted=preempted)
            audit.record(
                s,
                actor=ctx.actor,
                action="job.requeue",
                resource=resource(project, job_id),
                details={
                    "attempt": row.attempt,
                    "preempted": preempted,
                    "preemptions": row.preemptions,
                    "message": message[:500],
                },
            )
            status = JobStatus.QUEUED
    revoke_token(ctx, job_id=job_id)
    return status


def record_launch(
    ctx: Context, *, job_id: str, ref: Mapping[str, Any], token: str | None = None
) -> bool:
    """Store what the executor's ``launch`` returned and release the launch lease; False when
    the job is no longer RUNNING or no longer ours to launch (``token``: the lease we hold)."""
    recorded, _cancelled = record_launches(ctx, {job_id: ref}, token=token)
    return bool(recorded)


def record_launches(
    ctx: Context, refs: Mapping[str, Mapping[str, Any]], *, token: str | None = None
) -> tuple[list[str], list[str]]:
    """``record_launch`` for many jobs in ONE transaction: ``(recorded, cancelled)``, the ids
    whose reference was stored and lease released, and the ids (recorded or not) a cancel was
    asked for, perhaps while they were being launched, when it found no reference to stop: the
    caller stops those. Each row is guarded as ``record_launch`` guards it: still RUNNING and
    still under our lease."""
    recorded: list[str] = []
    cancelled: list[str] = []
    if not refs:
        return recorded, cancelled
    with ctx.db.transaction() as s:
        rows = {}
        for chunk in _chunks(list(refs)):
            query = select(JobRow).where(JobRow.id.in_(chunk)).with_for_update()
            rows.update({row.id: row for row in s.scalars(query)})
        for job_id, ref in refs.items():
            row = rows.get(job_id)
            if row is None:
                continue
            if row.cancel_requested:
                cancelled.append(job_id)
            if row.status != JobStatus.RUNNING.value:
                continue
            if token is not None and row.lock_token not in (None, token):
                continue
            row.executor_ref = {**(row.executor_ref or {}), **dict(ref)}
            row.lock_token = None
            row.lock_expires_at = None
            recorded.append(job_id)
    return recorded, cancelled


def update_ref(ctx: Context, *, job_id: str, **values: Any) -> bool:
    """Merge ``values`` into a RUNNING job's executor reference (e.g. the job's pid once its
    process started); False when it is not RUNNING."""
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.status != JobStatus.RUNNING.value:
            return False
        row.executor_ref = {**(row.executor_ref or {}), **values}
    return True


def set_enforcement(ctx: Context, *, job_id: str, enforcement: str) -> None:
    """Record how the job's limits are enforced (the executor's description)."""
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is not None:
            row.enforcement = enforcement


def issue_token(ctx: Context, *, job_id: str, project: str, run_id: str | None) -> str:
    """The job-scoped token a server hands the job it launches (``security.principals``: its
    own run, its project's inputs and models, nothing else); revoked when the job ends."""
    return principals.issue_job_token(ctx, job_id=job_id, project=project, run_id=run_id)


def issue_tokens(ctx: Context, jobs: Sequence[tuple[str, str, str | None]]) -> dict[str, str]:
    """``issue_token`` for many ``(job_id, project, run_id)`` in ONE transaction (the jobs one
    admission step launches): job id -> secret. All or none: on an error nothing is issued."""
    if not jobs:
        return {}
    with ctx.db.transaction() as s:
        return principals.issue_job_tokens_in(s, ctx, jobs)


def issue_tokens_in(
    s: Session, ctx: Context, jobs: Sequence[tuple[str, str, str | None]]
) -> dict[str, str]:
    """``issue_tokens`` inside the caller's write transaction, for the jobs whose project the
    caller may launch in; the others are left out (their launch issues its own, and fails on
    its own), so one project's refusal never rolls back the caller's transaction."""
    allowed: list[tuple[str, str, str | None]] = []
    refused: set[str] = set()
    for job in jobs:
        project = job[1]
        if project not in refused:
            try:
                authorize(ctx, project=project, need=Role.EDITOR)
            except ShipyardError:
                refused.add(project)
                continue
            allowed.append(job)
    return principals.issue_job_tokens_in(s, ctx, allowed) if allowed else {}


def revoke_token(ctx: Context, *, job_id: str) -> None:
    """Revoke every token issued to the job (a no-op when it had none)."""
    principals.revoke_job_tokens(ctx, job_id=job_id)


# --- row-level helpers (inside the caller's transaction) --------------------------------------


def finish_row(
    s: Session,
    row: JobRow,
    status: JobStatus,
    *,
    message: str,
    exit_code: int | None = None,
    usage: JobUsage | None = None,
    outputs: list[str] | None = None,
) -> None:
    """Move a job to a finished status (guarded by the state machine) and settle its run."""
    check_transition(JobStatus(row.status), status, job_id=row.id)
    now = utcnow()
    if row.status == JobStatus.RUNNING.value:
        row.attained_gpu_s = (row.attained_gpu_s or 0.0) + attempt_gpu_seconds(row, now)
    row.status = status.value
    row.message = message
    row.finished_at = now
    row.preempt_requested = False
    row.lock_token = None
    row.lock_expires_at = None
    if exit_code is not None:
        row.exit_code = exit_code
    if usage is not None:
        row.usage = usage.model_dump()
    if outputs is not None:
        row.outputs = list(outputs)
    if row.run_id is not None:
        # The job's process normally finishes its own run (shipyard.init() does at exit); this
        # settles a run the process left open, e.g. a script that never called init().
        run = s.get(RunRow, row.run_id)
        if run is not None and run.status == RunStatus.RUNNING.value:
            run.status = {
                JobStatus.SUCCEEDED: RunStatus.FINISHED,
                JobStatus.CANCELLED: RunStatus.KILLED,
            }.get(status, RunStatus.FAILED).value
            run.finished_at = row.finished_at


def requeue_row(s: Session, row: JobRow, *, message: str, preempted: bool) -> None:
    """RUNNING -> QUEUED for the next attempt (see :func:`requeue_job`)."""
    check_transition(JobStatus(row.status), JobStatus.QUEUED, job_id=row.id)
    now = utcnow()
    row.attained_gpu_s = (row.attained_gpu_s or 0.0) + attempt_gpu_seconds(row, now)
    row.status = JobStatus.QUEUED.value
    row.attempt = (row.attempt or 1) + 1
    if preempted:
        row.preemptions = (row.preemptions or 0) + 1
    row.message = f"waiting: requeued for attempt {row.attempt}: {message}"
    row.placement = []
    row.assigned_gpus = []
    row.executor_ref = None
    row.preempt_requested = False
    row.lock_token = None
    row.lock_expires_at = None
    row.started_at = None
    if row.run_id is not None:
        run = s.get(RunRow, row.run_id)
        if run is not None and run.status == RunStatus.RUNNING.value:
            # no heartbeats while it waits: the crash sweep must not take it for a dead process
            run.heartbeat_at = None


def attempt_gpu_seconds(row: JobRow | Any, now: datetime) -> float:
    """GPU-seconds the current attempt has received so far (0 unless it is RUNNING); ``row``:
    a JobRow, or a result row with its ``status``, ``started_at`` and ``gpu_units``."""
    started = aware(row.started_at)
    if row.status != JobStatus.RUNNING.value or started is None:
        return 0.0
    return max(0.0, (now - started).total_seconds()) * float(row.gpu_units or 0.0)


def row_with_project(s: Session, job_id: str, *, for_update: bool = False) -> tuple[JobRow, str]:
    if not isinstance(job_id, str) or not job_id:
        raise InvalidInputError("job_id must be a non-empty string", field="job_id")
    query = (
        select(JobRow, ProjectRow.name)
        .join(ProjectRow, JobRow.project_id == ProjectRow.id)
        .where(JobRow.id == job_id)
    )
    if for_update:
        query = query.with_for_update(of=JobRow)
    found = s.execute(query).first()
    if found is None:
        raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
    row, project = found
    return row, project


def rows_with_projects(
    s: Session, job_ids: Sequence[str], *, for_update: bool = False
) -> dict[str, tuple[JobRow, str]]:
    """``row_with_project`` for many ids in a few statements; ids that do not exist are left
    out."""
    found: dict[str, tuple[JobRow, str]] = {}
    for chunk in _chunks(list(dict.fromkeys(job_ids))):
        query = (
            select(JobRow, ProjectRow.name)
            .join(ProjectRow, JobRow.project_id == ProjectRow.id)
            .where(JobRow.id.in_(chunk))
        )
        if for_update:
            query = query.with_for_update(of=JobRow)
        for row, project in s.execute(query).all():
            found[row.id] = (row, project)
    return found


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Bounded IN lists (SQLite caps the parameters of one statement)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def to_domain(row: JobRow, project: str) -> Job:
    return Job(
        id=row.id,
        project=project,
        name=row.name,
        spec=JobSpec.model_validate(row.spec),
        status=JobStatus(row.status),
        code_digest=row.code_digest,
        run_id=row.run_id,
        assigned_gpus=[int(g) for g in row.assigned_gpus or ()],
        exit_code=row.exit_code,
        message=row.message or "",
        usage=JobUsage.model_validate(row.usage or {}),
        created_at=aware(row.created_at) or utcnow(),
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
        created_by=row.created_by,
        enforcement=row.enforcement or "",
        executor=row.executor or "local",
        attempt=row.attempt or 1,
        preemptions=row.preemptions or 0,
        queue=row.queue or project,
        placement=list(row.placement or []),
        outputs=list(row.outputs or []),
    )


def resource(project: str, job_id: str) -> str:
    return f"project/{project}/job/{job_id}"
