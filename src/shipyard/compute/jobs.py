"""Jobs on the local executor: submit, list, cancel, read logs, wait, and the scheduler's tick.

How the pieces meet (nothing has to be started by hand):

- ``submit_job`` validates, snapshots the code into the blob store, inserts a QUEUED row and calls
  ``tick``.
- ``tick`` is the scheduler step. It (1) fails RUNNING jobs whose supervisor process is gone
  ("supervisor lost", checked by pid *and* start time so a reused pid does not fool it) and stops
  what is left of their processes; (2) in one short write transaction under the ``scheduler``
  lock, loads the queued and running jobs, runs the pure policy (``compute.scheduler``), fails the
  unschedulable jobs and marks the admitted ones RUNNING with their GPUs; (3) after the commit,
  starts one detached supervisor (``python -m shipyard.compute.supervisor JOB_ID``) per job that
  *this* call admitted. The lock makes concurrent ticks (server thread, CLI, supervisors) safe: a
  job is admitted, and so spawned, exactly once.
- The supervisor runs the job, meters it, enforces the runtime limit and cancellation, records the
  outcome, and calls ``tick`` once more so the queue moves on as soon as capacity frees up.
- A server calls ``tick`` every second; without one, ``submit_job``, every supervisor's exit and
  ``wait_job`` call it, which is enough to keep an embedded home moving.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.blobs.store import check_digest
from shipyard.children import Children
from shipyard.compute.processes import create_time, kill_job, process_alive
from shipyard.compute.resources import machine_capacity
from shipyard.compute.scheduler import Allocation, Request, never_fits, schedule
from shipyard.compute.snapshot import list_code, snapshot_code
from shipyard.context import Context, new_id
from shipyard.domain.jobs import check_transition
from shipyard.domain.models import Job, JobSpec, JobStatus, JobUsage, RunStatus
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    ResourceUnavailableError,
)
from shipyard.security import audit, principals
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.rbac import authorize, authorize_resource, viewable
from shipyard.settings import (
    ENV_BLOBS,
    ENV_CPUS,
    ENV_DB,
    ENV_GPUS,
    ENV_HOME,
    ENV_JOB_ID,
    ENV_JOB_ROOT,
    ENV_JOB_USER,
    ENV_MEMORY_MB,
    ENV_PROJECT,
    ENV_RUN_ID,
    ENV_SERVER_URL,
    ENV_TOKEN,
    ENV_URL,
)
from shipyard.store.engine import lock
from shipyard.store.queries import project_id, project_names
from shipyard.store.tables import JobRow, ProjectRow, RunRow, aware, utcnow

LOG_FILE = "output.log"
SUPERVISOR_LOG_FILE = "supervisor.log"
DEFAULT_LOG_LIMIT = 1024 * 1024
MAX_LOG_LIMIT = 16 * 1024 * 1024
# A job admitted but whose supervisor never recorded itself (the admitting process died between
# its commit and the spawn) is failed after this long.
SUPERVISOR_START_GRACE_S = 60.0
# How long stopped jobs get between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0
_WAIT_POLL_S = 0.1
_WAIT_TICK_S = 1.0


def submit_job(
    ctx: Context,
    *,
    project: str,
    spec: JobSpec,
    code_dir: Path | None = None,
    run_id: str | None = None,
    code_digest: str | None = None,
) -> Job:
    """Queue ``spec`` in ``project`` and try to start it now.

    The job's code is a snapshot of ``code_dir`` taken now, or a snapshot (made with
    ``compute.snapshot.snapshot_code``) that a client already put in the blob store as
    ``code_digest``. Everything that could only fail later is checked first: the command must be
    found, the resources must fit on this machine, the snapshot must be safe to unpack, the run
    must exist. Nothing is stored when a check fails.
    """
    validate_name(project, field="project")
    authorize(ctx, project=project, need=Role.EDITOR)
    name = validate_name(spec.name, field="name") if spec.name else _default_name(spec.command)
    if code_dir is not None and code_digest is not None:
        raise InvalidInputError(
            "give the code as code_dir or as code_digest, not both", field="code_digest"
        )
    _check_arguments(spec.command)
    _check_env(spec.env)
    _check_fits(ctx, spec)
    archive, code_files = None, None
    if code_dir is not None:
        archive = snapshot_code(code_dir)
        code_files = set(list_code(archive))
    elif code_digest is not None:
        require_refs(ctx, project=project, digests=[code_digest], field="code_digest")
        archive = _uploaded_snapshot(ctx, code_digest)
        try:
            code_files = set(list_code(archive))
        except InvalidInputError as exc:
            raise type(exc)(
                f"code_digest {code_digest}: {exc.message}", field="code_digest"
            ) from None
    _check_executable(spec, code_files, code_dir)
    if code_dir is not None and archive is not None:
        code_digest = ctx.blobs.put_bytes(archive).digest

    job_id = new_id()
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=True)
        if code_digest is not None:
            add_refs(s, project_pk=pid, digests=[code_digest])
        if run_id is not None:
            run = s.get(RunRow, run_id)
            if run is None or run.project_id != pid:
                raise NotFoundError(
                    f"run {run_id!r} does not exist in project {project!r}; start the run first "
                    "or leave run_id out",
                    field="run_id",
                )
            run.job_id = job_id
        s.add(
            JobRow(
                id=job_id,
                project_id=pid,
                name=name,
                spec=spec.model_dump(mode="json"),
                status=JobStatus.QUEUED.value,
                priority=spec.priority,
                cpus=spec.resources.cpus,
                memory_mb=spec.resources.memory_mb,
                gpus=spec.resources.gpus,
                code_digest=code_digest,
                run_id=run_id,
                assigned_gpus=[],
                message="",
                usage={},
                cancel_requested=False,
                created_at=utcnow(),
                created_by=ctx.actor,
            )
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="job.submit",
            resource=_resource(project, job_id),
            details={
                "name": name,
                "command": spec.command,
                "env_keys": sorted(spec.env),
                "resources": spec.resources.model_dump(),
                "priority": spec.priority,
                "code_digest": code_digest,
                "run_id": run_id,
            },
        )
    tick(ctx)
    return get_job(ctx, job_id=job_id)


def list_jobs(
    ctx: Context, *, project: str | None = None, status: JobStatus | str | None = None
) -> list[Job]:
    """Jobs, newest first, optionally of one project and one status."""
    wanted = _parse_status(status) if status is not None else None
    with ctx.db.read() as s:
        query = select(JobRow, ProjectRow.name).join(ProjectRow, JobRow.project_id == ProjectRow.id)
        if project is not None:
            authorize(ctx, project=project, need=Role.VIEWER)
            query = query.where(JobRow.project_id == project_id(s, project, create=False))
        elif not ctx.principal.server_admin:
            names = project_names(s)
            query = query.where(
                ProjectRow.name.in_(viewable(ctx.principal, sorted(names.values())))
            )
        if wanted is not None:
            query = query.where(JobRow.status == wanted.value)
        rows = s.execute(query.order_by(JobRow.created_at.desc(), JobRow.id)).all()
        return [_to_domain(row, project_name) for row, project_name in rows]


def get_job(ctx: Context, *, job_id: str, project: str | None = None) -> Job:
    with ctx.db.read() as s:
        row, owner = _row_with_project(s, job_id)
        _authorize(ctx, job_id, owner, given=project, need=Role.VIEWER)
        return _to_domain(row, owner)


def cancel_job(ctx: Context, *, job_id: str, project: str | None = None) -> Job:
    """Cancel a job: a queued one at once; a running one is stopped by its supervisor.

    Cancelling a running job that is already being cancelled is a no-op; cancelling a finished
    job is an :class:`InvalidStateError`.
    """
    with ctx.db.transaction() as s:
        lock(s, "scheduler")  # so that a concurrent tick cannot admit it while we cancel it
        row, owner = _row_with_project(s, job_id, for_update=True)
        _authorize(ctx, job_id, owner, given=project, need=Role.EDITOR)
        project = owner
        current = JobStatus(row.status)
        if current.finished:
            raise InvalidStateError(
                f"job {job_id} has already finished ({current.value}); there is nothing to cancel",
                field="status",
            )
        check_transition(current, JobStatus.CANCELLED, job_id=job_id)
        was_queued = current is JobStatus.QUEUED
        if was_queued:
            _finish_row(s, row, JobStatus.CANCELLED, message="cancelled before it started")
        elif row.cancel_requested:
            return _to_domain(row, project)
        else:
            row.cancel_requested = True
        audit.record(
            s,
            actor=ctx.actor,
            action="job.cancel",
            resource=_resource(project, job_id),
            details={"status": current.value},
        )
    if was_queued:
        tick(ctx)  # it may have been the job that held the queue
    return get_job(ctx, job_id=job_id)


def read_logs(
    ctx: Context,
    *,
    job_id: str,
    offset: int = 0,
    limit: int = DEFAULT_LOG_LIMIT,
    project: str | None = None,
) -> tuple[bytes, int, bool]:
    """Up to ``limit`` bytes of the job's output from ``offset``: ``(data, new_offset, finished)``.

    ``finished`` is true once the job has finished and everything it wrote has been read, so a
    follower can poll until it sees ``finished`` and be sure it missed nothing.
    """
    if offset < 0:
        raise InvalidInputError(f"offset {offset} must not be negative", field="offset")
    if not 1 <= limit <= MAX_LOG_LIMIT:
        raise InvalidInputError(
            f"limit {limit} must be between 1 and {MAX_LOG_LIMIT} bytes", field="limit"
        )
    # The status is read before the file: once finished, the log is complete.
    job = get_job(ctx, job_id=job_id, project=project)
    path = log_path(ctx, job_id)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:
        size, data = 0, b""
    new_offset = offset + len(data)
    return data, new_offset, job.status.finished and new_offset >= size


def wait_job(
    ctx: Context, *, job_id: str, timeout: float | None = None, project: str | None = None
) -> Job:
    """Poll until the job has finished, and return it; after ``timeout`` seconds return it as is.

    Check ``job.status.finished`` when a timeout was given. Also calls :func:`tick` now and then,
    so a lost supervisor is noticed and the queue moves even when no server runs.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    next_tick = time.monotonic() + _WAIT_TICK_S
    while True:
        job = get_job(ctx, job_id=job_id, project=project)
        now = time.monotonic()
        if job.status.finished or (deadline is not None and now >= deadline):
            return job
        if now >= next_tick:
            tick(ctx)
            next_tick = now + _WAIT_TICK_S
        time.sleep(_WAIT_POLL_S)


def tick(ctx: Context) -> list[str]:
    """One scheduler step (see the module docstring); returns the ids of the jobs it started."""
    _children.reap_exited()
    _reap_lost_supervisors(ctx)
    with ctx.db.read() as s:
        waiting = s.scalar(
            select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value).limit(1)
        )
    if waiting is None:
        return []
    capacity = machine_capacity(ctx.settings)  # may run nvidia-smi: before the transaction
    with ctx.db.transaction() as s:
        lock(s, "scheduler")
        rows = s.scalars(
            select(JobRow).where(
                JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
            )
        ).all()
        running = [
            Allocation(
                job_id=r.id,
                cpus=r.cpus,
                memory_mb=r.memory_mb,
                gpus=tuple(int(g) for g in r.assigned_gpus or ()),
            )
            for r in rows
            if r.status == JobStatus.RUNNING.value
        ]
        queued = [
            Request(
                job_id=r.id,
                cpus=r.cpus,
                memory_mb=r.memory_mb,
                gpus=r.gpus,
                priority=r.priority,
                created_at=aware(r.created_at) or utcnow(),
            )
            for r in rows
            if r.status == JobStatus.QUEUED.value
        ]
        decision = schedule(capacity=capacity, running=running, queued=queued)
        if not decision.admitted and not decision.unschedulable:
            return []
        by_id = {r.id: r for r in rows}
        projects = project_names(s)
        for rejection in decision.unschedulable:
            row = by_id[rejection.job_id]
            message = f"unschedulable: {rejection.reason}, more than this machine has"
            _finish_row(s, row, JobStatus.FAILED, message=message)
            audit.record(
                s,
                actor=ctx.actor,
                action="job.finish",
                resource=_resource(projects[row.project_id], row.id),
                details={"status": JobStatus.FAILED.value, "message": message},
            )
        now = utcnow()
        for admission in decision.admitted:
            row = by_id[admission.job_id]
            check_transition(JobStatus(row.status), JobStatus.RUNNING, job_id=row.id)
            row.status = JobStatus.RUNNING.value
            row.assigned_gpus = list(admission.gpus)
            row.started_at = now
            audit.record(
                s,
                actor=ctx.actor,
                action="job.start",
                resource=_resource(projects[row.project_id], row.id),
                details={"gpus": list(admission.gpus)},
            )
    started = [a.job_id for a in decision.admitted]
    for job_id in started:
        _start_supervisor(ctx, job_id)
    return started


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
) -> bool:
    """Record a job's end (the supervisor's last write); False when it had already ended."""
    with ctx.db.transaction() as s:
        row, project = _row_with_project(s, job_id, for_update=True)
        if JobStatus(row.status).finished:
            return False
        _finish_row(s, row, status, message=message, exit_code=exit_code, usage=usage)
        audit.record(
            s,
            actor=ctx.actor,
            action="job.finish",
            resource=_resource(project, job_id),
            details={"status": status.value, "exit_code": exit_code, "message": message[:500]},
        )
    revoke_token(ctx, job_id=job_id)
    return True


def issue_token(ctx: Context, *, job_id: str, project: str, run_id: str | None) -> str:
    """The job-scoped token a server hands the job it launches (``security.principals``: its
    own run, its project's inputs and models, nothing else); revoked when the job ends."""
    return principals.issue_job_token(ctx, job_id=job_id, project=project, run_id=run_id)


def revoke_token(ctx: Context, *, job_id: str) -> None:
    """Revoke every token issued to the job (a no-op when it had none)."""
    principals.revoke_job_tokens(ctx, job_id=job_id)


def supervisor_env(ctx: Context) -> dict[str, str]:
    """The environment a supervisor starts with: ours, plus where the metadata and blobs live
    and what the machine offers (its own ticks need both), plus - from a server - its URL and
    job user (so the job is launched as a server's, see ``compute.sandbox``), minus any job
    identity we run under (a job that submits jobs must not hand its own id down)."""
    settings = ctx.settings
    env = dict(os.environ)
    for key in (
        ENV_JOB_ID,
        ENV_RUN_ID,
        ENV_PROJECT,
        ENV_URL,
        ENV_TOKEN,
        ENV_CPUS,
        ENV_MEMORY_MB,
        ENV_GPUS,
        ENV_SERVER_URL,
        ENV_JOB_USER,
        ENV_JOB_ROOT,
    ):
        env.pop(key, None)
    env[ENV_HOME] = str(settings.home)
    env[ENV_DB] = settings.database_url
    env[ENV_BLOBS] = settings.blob_url
    for key, value in (
        (ENV_CPUS, settings.cpus),
        (ENV_MEMORY_MB, settings.memory_mb),
        (ENV_GPUS, settings.gpus),
        (ENV_URL, settings.url),
        (ENV_TOKEN, settings.token),
        (ENV_SERVER_URL, settings.server_url),
        (ENV_JOB_USER, settings.job_user),
        (ENV_JOB_ROOT, settings.job_root),
    ):
        if value is not None:
            env[key] = str(value)
    return env


# --- helpers ---------------------------------------------------------------------------------


# Supervisors this process started, reaped on every tick.
_children = Children()


def _start_supervisor(ctx: Context, job_id: str) -> None:
    folder = job_dir(ctx, job_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / SUPERVISOR_LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "shipyard.compute.supervisor", job_id],
                cwd=folder,
                env=supervisor_env(ctx),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.FAILED,
            message=f"could not start the job's supervisor: {exc}",
        )
        return
    _children.add(proc)
    # The supervisor records itself too; writing it here closes the window in which a crash of
    # this process would leave the job RUNNING with no supervisor on record.
    started = create_time(proc.pid)  # None if it is already gone: then the next tick reaps it
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is not None and row.supervisor_pid is None and row.status == JobStatus.RUNNING.value:
            row.supervisor_pid = proc.pid
            row.supervisor_started = started


def _reap_lost_supervisors(ctx: Context) -> None:
    with ctx.db.read() as s:
        candidates = s.execute(
            select(
                JobRow.id, JobRow.supervisor_pid, JobRow.supervisor_started, JobRow.started_at
            ).where(JobRow.status == JobStatus.RUNNING.value)
        ).all()
    now = time.time()
    lost: list[tuple[str, int | None]] = []
    for job_id, sup_pid, sup_started, started_at in candidates:
        if sup_pid is None:
            started = aware(started_at)
            if started is not None and now - started.timestamp() > SUPERVISOR_START_GRACE_S:
                lost.append((job_id, None))
        elif not process_alive(sup_pid, sup_started):
            lost.append((job_id, sup_pid))
    if not lost:
        return
    stopped: list[tuple[str, int | None]] = []
    with ctx.db.transaction() as s:
        lock(s, "scheduler")
        projects = project_names(s)
        for job_id, sup_pid in lost:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != JobStatus.RUNNING.value:
                continue  # it finished meanwhile
            if row.supervisor_pid != sup_pid:
                continue  # a supervisor recorded itself meanwhile
            if sup_pid is None:
                message = (
                    f"supervisor lost: it never started within {SUPERVISOR_START_GRACE_S:g}s of "
                    "admission"
                )
            else:
                message = (
                    f"supervisor lost: its process (pid {sup_pid}) is gone, so the job's "
                    f"processes were stopped; see {SUPERVISOR_LOG_FILE} in the job's folder, "
                    "and submit the job again"
                )
            target = JobStatus.CANCELLED if row.cancel_requested else JobStatus.FAILED
            _finish_row(s, row, target, message=message)
            audit.record(
                s,
                actor=ctx.actor,
                action="job.finish",
                resource=_resource(projects[row.project_id], row.id),
                details={"status": target.value, "message": message},
            )
            stopped.append((job_id, row.pid))
    for job_id, leader in stopped:
        kill_job(job_id, leader, grace=KILL_GRACE_S)
        revoke_token(ctx, job_id=job_id)


def _finish_row(
    s: Session,
    row: JobRow,
    status: JobStatus,
    *,
    message: str,
    exit_code: int | None = None,
    usage: JobUsage | None = None,
) -> None:
    """Move a job to a finished status (guarded by the state machine) and settle its run."""
    check_transition(JobStatus(row.status), status, job_id=row.id)
    row.status = status.value
    row.message = message
    row.finished_at = utcnow()
    if exit_code is not None:
        row.exit_code = exit_code
    if usage is not None:
        row.usage = usage.model_dump()
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


def _row_with_project(s: Session, job_id: str, *, for_update: bool = False) -> tuple[JobRow, str]:
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


def _authorize(ctx: Context, job_id: str, owner: str, *, given: str | None, need: Role) -> None:
    authorize_resource(
        ctx,
        project=owner,
        given=given,
        need=need,
        missing=NotFoundError(f"job {job_id!r} does not exist", field="job_id"),
    )


def _to_domain(row: JobRow, project: str) -> Job:
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
    )


def _check_arguments(command: list[str]) -> None:
    for index, arg in enumerate(command):
        if not isinstance(arg, str) or "\x00" in arg:
            raise InvalidInputError(
                f"command argument {index} must be a string without NUL characters",
                field="command",
            )
    if not command[0].strip():
        raise InvalidInputError(
            "command is empty: give the program to run, e.g. ['python', 'train.py']",
            field="command",
        )


def _check_fits(ctx: Context, spec: JobSpec) -> None:
    reason = never_fits(
        machine_capacity(ctx.settings),
        cpus=spec.resources.cpus,
        memory_mb=spec.resources.memory_mb,
        gpus=spec.resources.gpus,
    )
    if reason is not None:
        raise ResourceUnavailableError(
            f"{reason}, so it could never start here; ask for less, or set SHIPYARD_CPUS, "
            "SHIPYARD_MEMORY_MB or SHIPYARD_GPUS if the machine really has more",
            field="resources",
        )


def _uploaded_snapshot(ctx: Context, code_digest: str) -> bytes:
    try:
        check_digest(code_digest)
    except InvalidInputError:
        raise InvalidInputError(
            f"code_digest {code_digest!r} is not a BLAKE3 hex digest", field="code_digest"
        ) from None
    if not ctx.blobs.exists(code_digest):
        raise NotFoundError(
            f"code snapshot {code_digest} is not in the blob store; upload it first",
            field="code_digest",
        )
    return ctx.blobs.get_bytes(code_digest)


def _check_executable(spec: JobSpec, code_files: set[str] | None, code_dir: Path | None) -> None:
    """The program must be a file of the code, an existing absolute path, or on PATH."""
    exe = spec.command[0]
    if os.path.isabs(exe):
        found = os.path.isfile(exe)
    elif code_files is not None and posixpath.normpath(exe) in code_files:
        found = True
    elif "/" in exe:
        found = False  # a relative path resolves in the job's folder, which holds only the code
    else:
        search_path = spec.env.get("PATH", os.environ.get("PATH", os.defpath))
        found = shutil.which(exe, path=search_path) is not None
    if found:
        return
    if code_files is None:
        where, fix = "on PATH", "install it, give its full path, or send the code along with it"
    else:
        code = f"code_dir {str(code_dir)!r}" if code_dir is not None else "the code snapshot"
        where, fix = f"on PATH or in {code}", "install it, give its full path, or add it there"
    raise InvalidInputError(f"command {exe!r} was not found {where}; {fix}", field="command")


def _check_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise InvalidInputError(
                f"env variable {key!r} is not valid: names must be non-empty without '=' or NUL, "
                "and values without NUL",
                field="env",
            )


def _default_name(command: list[str]) -> str:
    base = os.path.basename(command[0]) if command and command[0] else ""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-_")
    cleaned = cleaned.replace("..", ".")[:64]
    with contextlib.suppress(InvalidInputError):
        return validate_name(cleaned)
    return "job"


def _parse_status(status: JobStatus | str) -> JobStatus:
    try:
        return JobStatus(status)
    except ValueError:
        allowed = ", ".join(s.value for s in JobStatus)
        raise InvalidInputError(
            f"status {status!r} is not a job status; use one of {allowed}", field="status"
        ) from None


def _resource(project: str, job_id: str) -> str:
    return f"project/{project}/job/{job_id}"
