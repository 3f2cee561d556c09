"""Job rows: row <-> domain, the guarded status changes, and where a job's files live.

Every change of a job's status goes through here (``finish_job``, ``requeue_job``, and the
admission pipeline's ``admit_row`` / ``finish_row``), checked against the state machine in
``domain.jobs``; the service (``compute.jobs``), the pipeline (``compute.admission``) and the
executors' own processes (the local supervisor) all call these, never write ``status`` themselves.

A job's folder is ``$SHIPYARD_HOME/jobs/<id>``; its combined log (every rank, every attempt) is
``output.log`` there.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.jobs import check_transition
from shipyard.domain.models import Job, JobSpec, JobStatus, JobUsage, RunStatus
from shipyard.domain.names import validate_name
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security import audit, principals
from shipyard.store.tables import JobRow, ProjectRow, RunRow, aware, utcnow

LOG_FILE = "output.log"
SUPERVISOR_LOG_FILE = "supervisor.log"


def log_path(ctx: Context, job_id: str) -> Path:
    return job_dir(ctx, job_id) / LOG_FILE


def job_dir(ctx: Context, job_id: str) -> Path:
    validate_name(job_id, field="job_id")
    return ctx.settings.jobs_dir / job_id


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
    with ctx.db.transaction() as s:
        row, project = row_with_project(s, job_id, for_update=True)
        if JobStatus(row.status).finished:
            return False
        if attempt is not None and row.attempt != attempt:
            return False
        finish_row(
            s, row, status, message=message, exit_code=exit_code, usage=usage, outputs=outputs
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="job.finish",
            resource=resource(project, job_id),
            details={"status": status.value, "exit_code": exit_code, "message": message[:500]},
        )
    revoke_token(ctx, job_id=job_id)
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
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.status != JobStatus.RUNNING.value:
            return False
        if token is not None and row.lock_token not in (None, token):
            return False
        row.executor_ref = {**(row.executor_ref or {}), **dict(ref)}
        row.lock_token = None
        row.lock_expires_at = None
    return True


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


def attempt_gpu_seconds(row: JobRow, now: datetime) -> float:
    """GPU-seconds the current attempt has received so far (0 unless it is RUNNING)."""
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
