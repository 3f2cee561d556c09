"""The per-job supervisor: ``python -m shipyard.compute.supervisor JOB_ID``.

``compute.jobs.tick`` starts one, detached (its own session), for every job it admits, with the
home, database, blob store and capacity settings in its environment. The supervisor

1. records its pid and start time on the job (so a tick can tell when it is lost), or exits if
   the job is no longer RUNNING or another supervisor holds it;
2. unpacks the code snapshot into ``$SHIPYARD_HOME/jobs/<id>/code`` (``compute.snapshot``; the
   job runs in ``jobs/<id>/work`` when it has no code) - or, for a server running as root, into
   a folder of the job user's outside the home (``compute.sandbox``);
3. runs the command in its own process group, output to ``jobs/<id>/output.log``, with the job's
   environment (``compute.sandbox.job_env``: embedded, ours; from a server, an allowlist and a
   job token; its GPUs in ``CUDA_VISIBLE_DEVICES``), its limits (``compute.limits``: cgroup v2,
   or RLIMIT_AS, and CPU affinity) and, from a root server, as the job user;
4. every ``POLL_S`` seconds samples CPU time and memory over the process tree, enforces
   ``max_runtime_s`` (TIMED_OUT), the memory limit over the whole tree (FAILED, saying so) and
   honours ``cancel_requested`` (CANCELLED), stopping the whole tree with SIGTERM, then SIGKILL
   after a grace period; it is the subreaper of the job's processes, so orphans are waited for
   and their CPU time counts;
5. records the outcome, exit code and usage (and fails or kills the job's run), stops anything
   the job left behind, and calls ``tick`` so that queued jobs start on the freed capacity.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from shipyard.compute import jobs, sandbox
from shipyard.compute.limits import (
    cgroup_cpu_seconds,
    memory_exceeded,
    memory_message,
    plan_limits,
    preexec,
    release,
)
from shipyard.compute.processes import (
    UsageMeter,
    become_subreaper,
    create_time,
    high_water_mark,
    kill_job,
    reap_orphans,
)
from shipyard.compute.snapshot import extract_code
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus, JobUsage
from shipyard.errors import ShipyardError
from shipyard.settings import Settings
from shipyard.store.tables import JobRow, ProjectRow

POLL_S = 0.2
FIRST_POLL_S = 0.02
LOG_TAIL_LINES = 15
LOG_TAIL_BYTES = 4096
ACTOR = "system:supervisor"


@dataclass(frozen=True, kw_only=True)
class _Claim:
    job_id: str
    project: str
    spec: JobSpec
    code_digest: str | None
    run_id: str | None
    gpus: list[int]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m shipyard.compute.supervisor JOB_ID", file=sys.stderr)
        return 2
    ctx = open_context(Settings.from_env(), actor=ACTOR)
    become_subreaper()
    return supervise(ctx, job_id=args[0])


def supervise(ctx: Context, *, job_id: str) -> int:
    """Run job ``job_id`` to its end and record the outcome (see the module docstring)."""
    stop = _StopFlag()
    claim = _claim(ctx, job_id)
    if claim is None:
        return 0
    try:
        _run(ctx, claim, stop)
    except Exception as exc:  # the job must never stay RUNNING because we crashed
        traceback.print_exc()
        kill_job(job_id, None, grace=jobs.KILL_GRACE_S)
        jobs.finish_job(
            ctx, job_id=job_id, status=JobStatus.FAILED, message=f"supervisor error: {exc!r}"
        )
    try:
        jobs.tick(ctx)
    except Exception:
        traceback.print_exc()
    return 0


def _run(ctx: Context, claim: _Claim, stop: _StopFlag) -> None:
    job_id = claim.job_id
    settings = ctx.settings
    folder = jobs.job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    served = settings.server_url is not None
    try:
        user = sandbox.resolve_job_user(settings)
    except ShipyardError as exc:
        jobs.finish_job(
            ctx, job_id=job_id, status=JobStatus.FAILED, message=f"could not start: {exc.message}"
        )
        return
    try:
        place = sandbox.sandbox_dir(settings, job_id, user)
        cwd = _prepare_workdir(ctx, claim, place, fresh=user is not None)
        home = tmpdir = None
        if served:
            home, tmpdir = place / "home", place / "tmp"
            for sub in (home, tmpdir):
                sub.mkdir(mode=sandbox.JOB_DIR_MODE, exist_ok=True)
        if user is not None:
            sandbox.hand_over(place, user)
    except (ShipyardError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        jobs.finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.FAILED,
            message=f"could not prepare the job's code: {message}",
        )
        return
    token = (
        jobs.issue_token(ctx, job_id=job_id, project=claim.project, run_id=claim.run_id)
        if served
        else None
    )
    env = sandbox.job_env(
        sandbox.LaunchedJob(
            job_id=job_id, project=claim.project, run_id=claim.run_id, gpus=claim.gpus
        ),
        claim.spec.env,
        shipyard_url=settings.server_url,
        token=token,
        settings=settings,
        home=home,
        tmpdir=tmpdir,
        user=user,
    )
    command = _resolve_command(claim.spec.command, cwd, env)
    resources = claim.spec.resources
    limits = plan_limits(
        job_id=job_id, cpus=resources.cpus, memory_mb=resources.memory_mb, gpus=resources.gpus
    )
    enforcement = limits.description + (f"; runs as user {user.name}" if user is not None else "")
    log_path = folder / jobs.LOG_FILE
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=preexec(
                    limits,
                    uid=user.uid if user is not None else None,
                    gid=user.gid if user is not None else None,
                ),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            release(limits)
            reason = getattr(exc, "strerror", None) or str(exc)
            message = f"could not start command {claim.spec.command[0]!r}: {reason}"
            log.write(f"shipyard: {message}\n".encode())
            jobs.finish_job(ctx, job_id=job_id, status=JobStatus.FAILED, message=message)
            return
    started = time.monotonic()
    meter = UsageMeter()
    meter.sample(proc.pid)  # at once: a short job may be gone by the next look
    _record_pid(ctx, job_id, proc.pid, enforcement)
    limit = claim.spec.max_runtime_s
    outcome: tuple[JobStatus, str] | None = None
    interval = FIRST_POLL_S
    while True:
        try:
            proc.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            pass
        interval = min(POLL_S, interval * 2)  # quick first looks, for short jobs
        meter.sample(proc.pid)
        reap_orphans(keep=proc.pid)
        if limit is not None and time.monotonic() - started > limit:
            outcome = (JobStatus.TIMED_OUT, f"ran past its max runtime of {limit:g}s; stopped")
        elif meter.resident_mb > resources.memory_mb:
            outcome = (
                JobStatus.FAILED,
                memory_message(
                    resources.memory_mb,
                    f"its processes held {meter.resident_mb:.0f} MB resident; stopped",
                ),
            )
        elif stop.signal is not None:
            outcome = (JobStatus.FAILED, f"its supervisor got {stop.signal} and stopped the job")
        elif _should_stop(ctx, job_id):
            outcome = (JobStatus.CANCELLED, "cancelled while running")
        if outcome is not None:
            kill_job(job_id, proc.pid, grace=jobs.KILL_GRACE_S)
            proc.wait()
            break
    wall = time.monotonic() - started
    exit_code = proc.returncode
    # Whatever the job left running in the background ends with it; being their subreaper, we
    # wait for them, so their CPU time counts.
    kill_job(job_id, proc.pid, grace=1.0)
    reap_orphans(keep=proc.pid)
    usage = _usage(meter, wall, cgroup_cpu_seconds(limits))
    if outcome is not None:
        status, message = outcome
    elif exit_code == 0:
        status, message = JobStatus.SUCCEEDED, "exited with code 0"
    else:
        tail = _log_tail(log_path)
        status = JobStatus.FAILED
        if memory_exceeded(limits, log_tail=tail, peak_mb=usage.peak_memory_mb):
            how = "killed by its cgroup" if limits.cgroup is not None else "an allocation failed"
            head = memory_message(resources.memory_mb, f"{limits.mechanism}: {how}")
            message = f"{head}; last lines of the log:\n{tail}" if tail else head
        else:
            message = _failure_message(exit_code, log_path)
    release(limits)
    if user is not None:  # the job user's folder outside our home: its code and scratch go
        shutil.rmtree(place, ignore_errors=True)
    jobs.finish_job(
        ctx, job_id=job_id, status=status, message=message, exit_code=exit_code, usage=usage
    )


# --- helpers ---------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGHUP/SIGINT so the loop can stop the job and record why."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name


def _claim(ctx: Context, job_id: str) -> _Claim | None:
    """Take the job if it is RUNNING and unclaimed (or claimed by us); None otherwise."""
    me, started = os.getpid(), create_time()
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.status != JobStatus.RUNNING.value:
            return None
        if row.supervisor_pid not in (None, me):
            return None
        row.supervisor_pid = me
        row.supervisor_started = started
        project = s.get(ProjectRow, row.project_id)
        claim = _Claim(
            job_id=row.id,
            project=project.name if project is not None else "",
            spec=JobSpec.model_validate(row.spec),
            code_digest=row.code_digest,
            run_id=row.run_id,
            gpus=[int(g) for g in row.assigned_gpus or ()],
        )
        cancelled = row.cancel_requested
    if cancelled:
        jobs.finish_job(
            ctx, job_id=job_id, status=JobStatus.CANCELLED, message="cancelled before it started"
        )
        return None
    return claim


def _prepare_workdir(ctx: Context, claim: _Claim, folder: Path, *, fresh: bool) -> Path:
    if fresh:
        sandbox.fresh_dir(folder)
    if claim.code_digest is None:
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        return work
    code = folder / "code"
    if code.exists():  # a half-written copy from an earlier attempt
        shutil.rmtree(code)
    extract_code(ctx.blobs.get_bytes(claim.code_digest), code)
    return code


def _resolve_command(command: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """A bare name that is not on PATH but is a file of the code runs from the code folder."""
    exe = command[0]
    if "/" in exe or shutil.which(exe, path=env.get("PATH", os.defpath)) is not None:
        return list(command)
    local = cwd / exe
    if local.is_file():
        return [str(local), *command[1:]]
    return list(command)


def _record_pid(ctx: Context, job_id: str, pid: int, enforcement: str) -> None:
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is not None:
            row.pid = pid
            row.enforcement = enforcement


def _should_stop(ctx: Context, job_id: str) -> bool:
    """True when the job was cancelled, or ended by someone else (a tick that thought us lost)."""
    with ctx.db.read() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            return True
        return bool(row.cancel_requested) or row.status != JobStatus.RUNNING.value


def _usage(meter: UsageMeter, wall: float, cgroup_cpu: float | None) -> JobUsage:
    # RUSAGE_CHILDREN covers the job and every descendant that was waited for - by its parent, or
    # by us as their subreaper once their parent was gone - exactly, even a job too short for any
    # sample; a cgroup's cpu.stat covers every process that ran in it. Its ru_maxrss (the largest
    # single process) also counts our own memory from before the child's exec, so it is evidence
    # about the job only when it beats our own high-water mark.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = max(meter.cpu_seconds, children.ru_utime + children.ru_stime, cgroup_cpu or 0.0)
    peak_mb = meter.peak_memory_mb
    child_peak = children.ru_maxrss * 1024  # KiB on Linux
    if child_peak > high_water_mark(os.getpid()):
        peak_mb = max(peak_mb, child_peak / (1024 * 1024))
    return JobUsage(
        cpu_seconds=round(cpu, 3), peak_memory_mb=round(peak_mb, 3), wall_seconds=round(wall, 3)
    )


def _failure_message(exit_code: int, log_path: Path) -> str:
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        head = f"was killed by {name}"
    else:
        head = f"exited with code {exit_code}"
    tail = _log_tail(log_path)
    return f"{head}; last lines of the log:\n{tail}" if tail else f"{head}; the log is empty"


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


if __name__ == "__main__":
    sys.exit(main())
