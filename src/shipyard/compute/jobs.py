"""Jobs: submit, list, get, cancel, read logs, wait - the service; admission runs elsewhere.

How the pieces meet (nothing has to be started by hand):

- ``submit_job`` validates (the command, the environment, that some node could ever hold the
  job, that its queue and GPU model exist), snapshots the code into the blob store, creates the
  job's run when none is given (every attempt attaches to it), writes one QUEUED row and
  returns. It does not schedule: in an embedded home (no server) it then runs one admission
  step inline, as before, so the job starts at once when it can; in a server it wakes the
  server's background pipeline (a process that runs none steps inline too).
- ``compute.admission.step`` is the pipeline (observe -> decide -> apply -> launch; see there).
- ``cancel_job``: a queued job is CANCELLED at once; a running one gets ``cancel_requested`` and
  its executor is told to stop it (a cancel always wins over a preemption's requeue).
- ``read_logs`` / ``wait_job`` read; ``wait_job`` also runs an admission step now and then, so an
  embedded home keeps moving while someone waits.

Rows are written only through ``compute.records`` (status changes) and here (the QUEUED insert).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from shipyard import wiring
from shipyard.blobs.store import check_digest
from shipyard.compute import admission, queues
from shipyard.compute.executors.base import ExecutorUnavailableError, NodeInfo
from shipyard.compute.records import (
    LOG_FILE,
    finish_row,
    job_dir,
    log_path,
    resource,
    row_with_project,
    to_domain,
)
from shipyard.compute.snapshot import list_code, snapshot_code
from shipyard.context import Context, new_id
from shipyard.domain.jobs import check_transition
from shipyard.domain.models import Job, JobSpec, JobStatus, RunStatus
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    ResourceUnavailableError,
)
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.rbac import authorize, authorize_resource, viewable
from shipyard.store.engine import lock
from shipyard.store.queries import project_id, project_names
from shipyard.store.tables import JobRow, ProjectRow, RunRow, utcnow

log = logging.getLogger("shipyard.compute")

DEFAULT_LOG_LIMIT = 1024 * 1024
MAX_LOG_LIMIT = 16 * 1024 * 1024
RUN_TAG = "shipyard.job_id"  # the tag of the run a job's submit creates
_WAIT_POLL_S = 0.1
_WAIT_STEP_S = 1.0

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "LOG_FILE",
    "MAX_LOG_LIMIT",
    "cancel_job",
    "get_job",
    "job_dir",
    "list_jobs",
    "log_path",
    "read_logs",
    "submit_job",
    "wait_job",
]


def submit_job(
    ctx: Context,
    *,
    project: str,
    spec: JobSpec,
    code_dir: Path | None = None,
    run_id: str | None = None,
    code_digest: str | None = None,
) -> Job:
    """Queue ``spec`` in ``project``; returns the job (QUEUED, or RUNNING when an inline step
    of an embedded home started it already).

    The job's code is a snapshot of ``code_dir`` taken now, or a snapshot (made with
    ``compute.snapshot.snapshot_code``) that a client already put in the blob store as
    ``code_digest``. Everything that could only fail later is checked first: the command must be
    found, some node must be able to hold one worker, the queue and GPU model must exist, the
    snapshot must be safe to unpack, the run must exist. Nothing is stored when a check fails.
    When the executor cannot be reached now (a Ray cluster that is down) the job is still
    queued, with the reason as its message, and starts when the executor is back.
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
    infos, unavailable = _cluster_nodes(ctx)
    with ctx.db.read() as s:  # an unknown queue or GPU model first: the clearer error
        queue = queues.check_submit(
            s,
            project=project,
            queue=spec.queue,
            gpu_type=spec.resources.gpu_type,
            nodes=[info.node for info in infos] if infos is not None else None,
        )
    if infos is not None:
        _check_fits(infos, spec)
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
    message = "" if unavailable is None else f"waiting: executor unavailable: {unavailable}"
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
        else:  # every attempt of the job attaches to this run
            run_id = new_id()
            s.add(
                RunRow(
                    id=run_id,
                    project_id=pid,
                    name=name,
                    status=RunStatus.RUNNING.value,
                    params={},
                    tags={RUN_TAG: job_id},
                    job_id=job_id,
                )
            )
            audit.record(
                s,
                actor=ctx.actor,
                action="run.create",
                resource=f"project/{project}/run/{run_id}",
                details={"job_id": job_id},
            )
        row = JobRow(
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
            message=message,
            usage={},
            cancel_requested=False,
            created_at=utcnow(),
            created_by=ctx.actor,
            executor=wiring.executor_scheme(ctx.settings.executor),
            executor_ref=None,
            attempt=1,
            preemptions=0,
            queue=queue,
            workers=spec.workers,
            gpu_units=spec.gpu_units,
            preemptible=spec.preemptible,
            preempt_requested=False,
            placement=[],
            attained_gpu_s=0.0,
            outputs=[],
            # every column set here, so the stored row is the returned job (no re-read)
            exit_code=None,
            started_at=None,
            finished_at=None,
            enforcement=None,
            lock_token=None,
            lock_expires_at=None,
        )
        s.add(row)
        audit.record(
            s,
            actor=ctx.actor,
            action="job.submit",
            resource=resource(project, job_id),
            details={
                "name": name,
                "command": spec.command,
                "env_keys": sorted(spec.env),
                "resources": spec.resources.model_dump(),
                "workers": spec.workers,
                "priority": spec.priority,
                "preemptible": spec.preemptible,
                "queue": queue,
                "code_digest": code_digest,
                "run_id": run_id,
            },
        )
    if _move_on(ctx):
        return get_job(ctx, job_id=job_id)  # the inline step may have started it
    return to_domain(row, project)  # as stored: a server's pipeline admits it in the background


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
        return [to_domain(row, project_name) for row, project_name in rows]


def get_job(ctx: Context, *, job_id: str, project: str | None = None) -> Job:
    with ctx.db.read() as s:
        row, owner = row_with_project(s, job_id)
        _authorize(ctx, job_id, owner, given=project, need=Role.VIEWER)
        return to_domain(row, owner)


def cancel_job(ctx: Context, *, job_id: str, project: str | None = None) -> Job:
    """Cancel a job: a queued one at once; a running one is stopped by its executor.

    Cancelling a running job that is already being cancelled is a no-op; cancelling a finished
    job is an :class:`InvalidStateError`. A job being preempted is cancelled, not requeued.
    """
    with ctx.db.transaction() as s:
        lock(s, "scheduler")  # so that a concurrent step cannot admit it while we cancel it
        row, owner = row_with_project(s, job_id, for_update=True)
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
            finish_row(s, row, JobStatus.CANCELLED, message="cancelled before it started")
        elif row.cancel_requested:
            return to_domain(row, project)
        else:
            row.cancel_requested = True
        executor, ref = row.executor, dict(row.executor_ref or {})
        audit.record(
            s,
            actor=ctx.actor,
            action="job.cancel",
            resource=resource(project, job_id),
            details={"status": current.value},
        )
    if not was_queued and ref:
        admission.stop_job(ctx, executor=executor, job_id=job_id, ref=ref, reason="cancel")
    _move_on(ctx)  # a queued one may have held the queue; a running one frees capacity soon
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

    Check ``job.status.finished`` when a timeout was given. Also runs an admission step now and
    then, so a lost supervisor is noticed and the queue moves even when no server runs.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    next_step = time.monotonic() + _WAIT_STEP_S
    while True:
        job = get_job(ctx, job_id=job_id, project=project)
        now = time.monotonic()
        if job.status.finished or (deadline is not None and now >= deadline):
            return job
        if now >= next_step:
            admission.step(ctx)
            next_step = now + _WAIT_STEP_S
        time.sleep(_WAIT_POLL_S)


# --- helpers ---------------------------------------------------------------------------------


def _move_on(ctx: Context) -> bool:
    """After a submit or cancel: a wake-up for the server's background pipeline, or one inline
    admission step where this process runs none (an embedded home: nothing else would).
    True when it stepped inline."""
    if ctx.settings.server_url is None or not admission.in_background():
        try:
            admission.step(ctx)
        except Exception:  # the job is stored; the next step (any process) picks it up
            log.exception("the inline admission step failed; the job stays queued")
        return True
    admission.wake()
    return False


def _cluster_nodes(ctx: Context) -> tuple[list[NodeInfo] | None, str | None]:
    """The executor's nodes, or (None, why) when it cannot be reached now."""
    executor = wiring.open_executor(ctx.settings.executor, ctx.settings)
    try:
        return executor.nodes(), None
    except ExecutorUnavailableError as exc:
        return None, exc.reason


def _check_fits(infos: list[NodeInfo], spec: JobSpec) -> None:
    reason = admission.never_fits([info.node for info in infos], spec)
    if reason is not None:
        raise ResourceUnavailableError(
            f"{reason}, so it could never start; ask for less, or - on this machine - set "
            "SHIPYARD_CPUS, SHIPYARD_MEMORY_MB or SHIPYARD_GPUS if it really has more",
            field="resources",
        )


def _authorize(ctx: Context, job_id: str, owner: str, *, given: str | None, need: Role) -> None:
    authorize_resource(
        ctx,
        project=owner,
        given=given,
        need=need,
        missing=NotFoundError(f"job {job_id!r} does not exist", field="job_id"),
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
