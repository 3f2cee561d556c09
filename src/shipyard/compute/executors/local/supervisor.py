"""The per-job supervisor: ``python -m shipyard.compute.executors.local.supervisor JOB_ID N``.

The local executor's ``launch`` starts one, detached (its own session), for every attempt of every
job admitted to it, with the home, database, blob store and capacity settings in its environment
(and, from a server, the attempt's job token). The supervisor

1. records its pid and start time in the job's executor reference (so ``observe`` can tell when
   it is lost), or exits if the job is no longer RUNNING, is at another attempt, or another
   supervisor holds it;
2. unpacks the code snapshot into ``$SHIPYARD_HOME/jobs/<id>/code`` (``compute.snapshot``; the
   job runs in ``jobs/<id>/work`` when it has no code) - or, for a server running as root, into
   a folder of the job user's outside the home (``compute.sandbox``);
3. starts every worker of the job as one gang (``compute.workers.Gang``): each in its own process
   group, with the job's environment (``compute.sandbox.job_env``: embedded, ours; from a server,
   an allowlist and the job token), its rank's torchrun variables (``compute.workers.rank_env``:
   ``MASTER_ADDR=127.0.0.1`` and a free port, for a job of one worker too), its GPUs in
   ``CUDA_VISIBLE_DEVICES`` (from the placement; a share of a GPU adds ``SHIPYARD_GPU_FRACTION``
   and ``SHIPYARD_GPU_MEMORY_MB``), the job's limits (``compute.limits``: cgroup v2, or
   RLIMIT_AS, and CPU affinity) and, from a root server, as the job user. Every worker's output
   goes to ``jobs/<id>/output.log`` (``PrefixedLog``: lines of a gang's rank N start
   ``[rank N] ``); a later attempt appends to the same log, after a "shipyard: attempt N started"
   line;
4. every ``POLL_S`` seconds (``LONG_POLL_S`` once it ran ``BUSY_S``; at once when
   ``LocalExecutor.stop`` signals it or a worker exits) samples CPU time and
   memory over every worker's process tree, enforces ``max_runtime_s`` (TIMED_OUT), the memory
   limit of each worker (FAILED, saying so), honours ``cancel_requested`` (CANCELLED) and
   ``preempt_requested`` (SIGTERM, ``Settings.preempt_grace_s``, SIGKILL, then the job is
   requeued for its next attempt - not failed); one worker that fails fails the whole gang, the
   others stopped, the message naming the rank and its exit code. It is the subreaper of the
   job's processes, so orphans are waited for and their CPU time counts;
5. after a job that ended (not one that was preempted) stores its declared outputs as artifacts
   of its run (``compute.outputs``) and writes what became of them, and of the other files the
   job wrote, into the log; then records the outcome, exit code, usage (summed over the workers)
   and stored outputs (``compute.records``, guarded by the attempt), stops anything the job left
   behind, and runs one admission step so queued jobs start on the freed capacity.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from shipyard.compute import admission, records, sandbox
from shipyard.compute.executors.local.launcher import (
    ENV_LAUNCH_TOKEN,
    KILL_GRACE_S,
    LOOK_SIGNAL,
    SUPERVISOR_MODULE,
)
from shipyard.compute.limits import (
    cgroup_cpu_seconds,
    memory_exceeded,
    memory_message,
    plan_limits,
    preexec,
    release,
)
from shipyard.compute.outputs import collect_outputs
from shipyard.compute.policy.base import Placement, WorkerPlacement
from shipyard.compute.processes import (
    UsageMeter,
    become_subreaper,
    create_time,
    high_water_mark,
    kill_job,
    reap_orphans,
)
from shipyard.compute.snapshot import extract_code
from shipyard.compute.workers import (
    Gang,
    GangResult,
    PrefixedLog,
    WorkerSlot,
    describe_exit,
    free_port,
    gang_layout,
    rank_env,
)
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus, JobUsage
from shipyard.errors import ShipyardError
from shipyard.settings import Settings
from shipyard.store.tables import JobRow, ProjectRow

POLL_S = 0.2
FIRST_POLL_S = 0.02
# After BUSY_S of running, the watch looks every LONG_POLL_S: each look walks the job's process
# trees and reads its row, 6% of a core at 0.2 s (2 ranks) - on a 2-core machine a DDP job ran
# 4% slower than under torchrun. A worker that exits (SIGCHLD) and the executor (LOOK_SIGNAL)
# still wake it at once; memory over the request is then caught within a second.
BUSY_S = 10.0
LONG_POLL_S = 1.0
LOG_TAIL_LINES = 15
LOG_TAIL_BYTES = 4096
ACTOR = "system:supervisor"
MASTER_ADDR = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class _Claim:
    job_id: str
    project: str
    spec: JobSpec
    code_digest: str | None
    run_id: str | None
    attempt: int
    placement: list[dict[str, Any]] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)  # rank 0's, for a job stored without placement


@dataclass(frozen=True, kw_only=True)
class _Outcome:
    status: JobStatus
    message: str
    grace_s: float = KILL_GRACE_S
    preempt: str | None = None  # the reason, when the job is being preempted
    stale: bool = False  # the job ended or moved to another attempt without us: record nothing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
        print(f"usage: python -m {SUPERVISOR_MODULE} JOB_ID [ATTEMPT]", file=sys.stderr)
        return 2
    # The attempt's job token (from a server): ours to hand the job, never inherited by it.
    token = os.environ.pop(ENV_LAUNCH_TOKEN, None) or None
    ctx = open_context(Settings.from_env(), actor=ACTOR)
    become_subreaper()
    attempt = int(args[1]) if len(args) == 2 else None
    return supervise(ctx, job_id=args[0], attempt=attempt, token=token)


def supervise(
    ctx: Context, *, job_id: str, attempt: int | None = None, token: str | None = None
) -> int:
    """Run job ``job_id`` to its end and record the outcome (see the module docstring)."""
    stop = _StopFlag()
    claim = _claim(ctx, job_id, attempt)
    if claim is None:
        return 0
    try:
        _run(ctx, claim, stop, token)
    except Exception as exc:  # the job must never stay RUNNING because we crashed
        traceback.print_exc()
        kill_job(job_id, None, grace=KILL_GRACE_S)
        records.finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.FAILED,
            message=f"supervisor error: {exc!r}",
            attempt=claim.attempt,
        )
    try:
        admission.step(ctx)
    except Exception:
        traceback.print_exc()
    return 0


def _run(ctx: Context, claim: _Claim, stop: _StopFlag, launch_token: str | None) -> None:
    job_id = claim.job_id
    settings = ctx.settings
    folder = records.job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    served = settings.server_url is not None

    def fail(message: str) -> None:
        records.finish_job(
            ctx, job_id=job_id, status=JobStatus.FAILED, message=message, attempt=claim.attempt
        )

    try:
        user = sandbox.resolve_job_user(settings)
    except ShipyardError as exc:
        fail(f"could not start: {exc.message}")
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
        fail(f"could not prepare the job's code: {message}")
        return
    token = launch_token
    if served and token is None:
        token = records.issue_token(ctx, job_id=job_id, project=claim.project, run_id=claim.run_id)
    slots = _slots(claim)
    world = len(slots)
    port = free_port(MASTER_ADDR)
    resources = claim.spec.resources
    envs: list[dict[str, str]] = []
    for slot in slots:
        env = sandbox.job_env(
            sandbox.LaunchedJob(
                job_id=job_id,
                project=claim.project,
                run_id=claim.run_id,
                gpus=list(slot.gpus),
                attempt=claim.attempt,
                gpu_fraction=(slot.gpu_share or resources.gpu_fraction)
                if resources.gpu_fraction
                else None,
                gpu_memory_mb=resources.gpu_memory_mb,
            ),
            claim.spec.env,
            shipyard_url=settings.server_url,
            token=token,
            settings=settings,
            home=home,
            tmpdir=tmpdir,
            user=user,
        )
        env.update(
            rank_env(
                slot,
                world_size=world,
                master_addr=MASTER_ADDR,
                master_port=port,
                job_id=job_id,
                restart_count=claim.attempt - 1,
                inherited=env,
            )
        )
        envs.append(env)
    command = _resolve_command(claim.spec.command, cwd, envs[0])
    # One cgroup / affinity set for the whole gang (every worker runs here); each worker's memory
    # is watched on its own below.
    limits = plan_limits(
        job_id=job_id,
        cpus=resources.cpus * world,
        memory_mb=resources.memory_mb * world,
        gpus=resources.gpus * world,
    )
    enforcement = limits.description + (f"; runs as user {user.name}" if user is not None else "")
    if world > 1:
        enforcement += f"; {world} workers, {resources.memory_mb} MB each watched"
    log_path = folder / records.LOG_FILE
    log = PrefixedLog(log_path, prefix=world > 1)
    if claim.attempt > 1:
        log.write_line(f"shipyard: attempt {claim.attempt} started")
    gang = Gang(
        commands=[command] * world,
        envs=envs,
        cwd=cwd,
        log=log,
        ranks=[slot.rank for slot in slots],
        preexec=preexec(
            limits,
            uid=user.uid if user is not None else None,
            gid=user.gid if user is not None else None,
        ),
        grace_s=KILL_GRACE_S,
    )
    started = time.monotonic()
    try:
        gang.start()
    except OSError as exc:
        release(limits)
        cause = exc.__cause__
        reason = getattr(cause, "strerror", None) or (str(cause) if cause else str(exc))
        if world > 1:
            message = str(exc)
        else:
            message = f"could not start command {claim.spec.command[0]!r}: {reason}"
        log.write_line(f"shipyard: {message}")
        log.close()
        fail(message)
        return
    pids = gang.pids()
    meters = [UsageMeter() for _ in pids]
    for meter, pid in zip(meters, pids, strict=True):
        meter.sample(pid)  # at once: a short job may be gone by the next look
    records.update_ref(ctx, job_id=job_id, pid=pids[0], pids=pids, attempt=claim.attempt)
    records.set_enforcement(ctx, job_id=job_id, enforcement=enforcement)
    outcome, result = _watch(ctx, claim, gang, meters, stop, started)
    wall = time.monotonic() - started
    # Whatever the job left running in the background ends with it; being their subreaper, we
    # wait for them, so their CPU time counts.
    kill_job(job_id, pids[0], grace=1.0)
    reap_orphans(keep=pids)
    log.close()
    usage = _usage(meters, wall, cgroup_cpu_seconds(limits))
    exit_code = result.exit_code
    if outcome is not None and outcome.stale:
        release(limits)
        if user is not None:
            shutil.rmtree(place, ignore_errors=True)
        _append(log_path, f"shipyard: attempt {claim.attempt} stopped: the job ended elsewhere")
        return
    if outcome is not None and outcome.preempt is not None:
        release(limits)
        if user is not None:
            shutil.rmtree(place, ignore_errors=True)
        _requeue(ctx, claim, outcome.preempt, usage, log_path)
        return
    if outcome is not None:
        status, message = outcome.status, outcome.message
    elif result.ok:
        status, message = JobStatus.SUCCEEDED, "exited with code 0"
    else:
        tail = _log_tail(log_path)
        status = JobStatus.FAILED
        if memory_exceeded(limits, log_tail=tail, peak_mb=max(m.peak_memory_mb for m in meters)):
            how = "killed by its cgroup" if limits.cgroup is not None else "an allocation failed"
            head = memory_message(resources.memory_mb, f"{limits.mechanism}: {how}")
            message = f"{head}; last lines of the log:\n{tail}" if tail else head
        elif world > 1:
            message = _with_tail(f"the gang failed: {result.message}", tail)
        else:
            message = _with_tail(describe_exit(exit_code), tail)
    release(limits)
    stored = _outputs(ctx, claim, cwd, log_path, discarded=user is not None)
    if user is not None:  # the job user's folder outside our home: its code and scratch go
        shutil.rmtree(place, ignore_errors=True)
    records.finish_job(
        ctx,
        job_id=job_id,
        status=status,
        message=message,
        exit_code=exit_code,
        usage=usage,
        outputs=stored,
        attempt=claim.attempt,
    )


def _watch(
    ctx: Context,
    claim: _Claim,
    gang: Gang,
    meters: Sequence[UsageMeter],
    stop: _StopFlag,
    started: float,
) -> tuple[_Outcome | None, GangResult]:
    """Poll the gang until it ends or must be stopped: (why we stopped it or None, its result)."""
    resources = claim.spec.resources
    limit = claim.spec.max_runtime_s
    pids = gang.pids()
    interval = FIRST_POLL_S
    while True:
        result = gang.poll()
        if result is not None:
            return None, result
        stop.look.wait(interval)
        stop.look.clear()
        # quick first looks for short jobs, rare ones for long jobs
        ceiling = POLL_S if time.monotonic() - started < BUSY_S else LONG_POLL_S
        interval = min(ceiling, interval * 2)
        for meter, pid in zip(meters, pids, strict=True):
            meter.sample(pid)
        reap_orphans(keep=pids)
        outcome = _check(ctx, claim, meters, stop, started, limit, resources.memory_mb)
        if outcome is None:
            continue
        gang.stop(outcome.grace_s)
        result = gang.poll()
        assert result is not None
        return outcome, result


def _check(
    ctx: Context,
    claim: _Claim,
    meters: Sequence[UsageMeter],
    stop: _StopFlag,
    started: float,
    limit: float | None,
    memory_mb: int,
) -> _Outcome | None:
    if limit is not None and time.monotonic() - started > limit:
        return _Outcome(
            status=JobStatus.TIMED_OUT, message=f"ran past its max runtime of {limit:g}s; stopped"
        )
    for rank, meter in enumerate(meters):
        if meter.resident_mb > memory_mb:
            whose = "its processes" if len(meters) == 1 else f"rank {rank}'s processes"
            return _Outcome(
                status=JobStatus.FAILED,
                message=memory_message(
                    memory_mb, f"{whose} held {meter.resident_mb:.0f} MB resident; stopped"
                ),
            )
    if stop.signal is not None:
        return _Outcome(
            status=JobStatus.FAILED, message=f"its supervisor got {stop.signal} and stopped the job"
        )
    with ctx.db.read() as s:
        row = s.get(JobRow, claim.job_id)
        if (
            row is None
            or row.status != JobStatus.RUNNING.value
            or (row.attempt or 1) != claim.attempt
        ):  # ended (or requeued) by someone else, e.g. a step that thought us lost
            return _Outcome(status=JobStatus.CANCELLED, message="ended elsewhere", stale=True)
        if row.cancel_requested:
            return _Outcome(status=JobStatus.CANCELLED, message="cancelled while running")
        if row.preempt_requested:
            reason = (row.message or "").removeprefix("preempting: ") or "preempted"
            return _Outcome(
                status=JobStatus.QUEUED,
                message=reason,
                grace_s=ctx.settings.preempt_grace_s,
                preempt=reason,
            )
    return None


def _requeue(ctx: Context, claim: _Claim, reason: str, usage: JobUsage, log_path: Path) -> None:
    """After a preemption: back to the queue for the next attempt (CANCELLED when a cancel came
    meanwhile - a cancel always wins), saying so in the log."""
    with ctx.db.read() as s:
        row = s.get(JobRow, claim.job_id)
        cancelled = row is not None and bool(row.cancel_requested)
    if cancelled:
        _append(log_path, f"shipyard: attempt {claim.attempt} stopped: cancelled while preempted")
        records.finish_job(
            ctx,
            job_id=claim.job_id,
            status=JobStatus.CANCELLED,
            message=f"cancelled while it was being preempted ({reason})",
            usage=usage,
            attempt=claim.attempt,
        )
        return
    _append(log_path, f"shipyard: attempt {claim.attempt} preempted: {reason}; requeued")
    after = records.requeue_job(
        ctx,
        job_id=claim.job_id,
        message=f"preempted: {reason}",
        preempted=True,
        attempt=claim.attempt,
        usage=usage,
    )
    if after is JobStatus.CANCELLED:  # the cancel came between our look and the requeue
        _append(log_path, "shipyard: ... but a cancel came first: the job is CANCELLED")


def _outputs(
    ctx: Context, claim: _Claim, cwd: Path, log_path: Path, *, discarded: bool
) -> list[str]:
    """Store the declared outputs as run artifacts and say in the log what became of every file
    the job wrote; the stored artifact paths."""
    try:
        report = collect_outputs(
            ctx,
            job_id=claim.job_id,
            project=claim.project,
            run_id=claim.run_id,
            workdir=cwd,
            declared=list(claim.spec.outputs),
            discarded=discarded,
        )
    except Exception as exc:  # the outcome is recorded whatever happened to the outputs
        traceback.print_exc()
        _append(log_path, f"shipyard: could not collect the job's outputs: {exc!r}")
        return []
    for line in report.lines():
        _append(log_path, line)
    return list(report.stored)


# --- helpers ---------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGHUP/SIGINT so the loop can stop the job and record why; ``look`` is set
    by ``LOOK_SIGNAL`` (the executor asking us to look at the job's row now) and by SIGCHLD (a
    worker, or an orphan, ended: look at the gang now)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.look = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._handle)
        signal.signal(LOOK_SIGNAL, self._wake)
        signal.signal(signal.SIGCHLD, self._wake)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        self.look.set()

    def _wake(self, _signum: int, _frame: FrameType | None) -> None:
        self.look.set()


def _claim(ctx: Context, job_id: str, attempt: int | None) -> _Claim | None:
    """Take the job if it is RUNNING at ``attempt`` and unclaimed (or claimed by us); None
    otherwise."""
    me, started = os.getpid(), create_time()
    with ctx.db.transaction() as s:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.status != JobStatus.RUNNING.value:
            return None
        if attempt is not None and (row.attempt or 1) != attempt:
            return None  # launched for an attempt that is over
        ref = dict(row.executor_ref or {})
        if ref.get("supervisor_pid") not in (None, me):
            return None
        ref.update(supervisor_pid=me, supervisor_started=started, host=socket.gethostname())
        row.executor_ref = ref
        project = s.get(ProjectRow, row.project_id)
        claim = _Claim(
            job_id=row.id,
            project=project.name if project is not None else "",
            spec=JobSpec.model_validate(row.spec),
            code_digest=row.code_digest,
            run_id=row.run_id,
            attempt=row.attempt or 1,
            placement=[dict(w) for w in row.placement or () if isinstance(w, Mapping)],
            gpus=[int(g) for g in row.assigned_gpus or ()],
        )
        cancelled = row.cancel_requested
    if cancelled:
        records.finish_job(
            ctx,
            job_id=job_id,
            status=JobStatus.CANCELLED,
            message="cancelled before it started",
            attempt=claim.attempt,
        )
        return None
    return claim


def _slots(claim: _Claim) -> list[WorkerSlot]:
    """One slot per worker, from the placement the pipeline stored (rank order)."""
    here = socket.gethostname()
    workers = [
        WorkerPlacement(
            node_id=str(w.get("node_id") or here),
            gpus=tuple(int(g) for g in w.get("gpus") or ()),
            gpu_share=float(w.get("gpu_share") or 0.0),
        )
        for w in claim.placement
    ]
    want = claim.spec.workers
    if len(workers) != want:  # stored without a placement per worker: rank 0's GPUs, one node
        first = workers[0] if workers else WorkerPlacement(node_id=here, gpus=tuple(claim.gpus))
        workers = [first] + [WorkerPlacement(node_id=first.node_id) for _ in range(want - 1)]
    return gang_layout(Placement(job_id=claim.job_id, workers=tuple(workers)))


def _prepare_workdir(ctx: Context, claim: _Claim, folder: Path, *, fresh: bool) -> Path:
    if fresh:
        sandbox.fresh_dir(folder)
    if claim.code_digest is None:
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        return work
    code = folder / "code"
    if code.exists():  # a half-written copy, or what an earlier attempt left
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


def _usage(meters: Sequence[UsageMeter], wall: float, cgroup_cpu: float | None) -> JobUsage:
    # Summed over the workers. RUSAGE_CHILDREN covers every worker and every descendant that was
    # waited for - by its parent, or by us as their subreaper once their parent was gone -
    # exactly, even a job too short for any sample; a cgroup's cpu.stat covers every process that
    # ran in it. Its ru_maxrss (the largest single process) also counts our own memory from
    # before the child's exec, so it is evidence about the job only when it beats our own
    # high-water mark.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampled = sum(meter.cpu_seconds for meter in meters)
    cpu = max(sampled, children.ru_utime + children.ru_stime, cgroup_cpu or 0.0)
    peak_mb = sum(meter.peak_memory_mb for meter in meters)
    child_peak = children.ru_maxrss * 1024  # KiB on Linux
    if child_peak > high_water_mark(os.getpid()):
        peak_mb = max(peak_mb, child_peak / (1024 * 1024))
    return JobUsage(
        cpu_seconds=round(cpu, 3), peak_memory_mb=round(peak_mb, 3), wall_seconds=round(wall, 3)
    )


def _with_tail(head: str, tail: str) -> str:
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


def _append(path: Path, line: str) -> None:
    """One "shipyard: ..." line at the end of the job's log (after its workers' pipes closed)."""
    data = line.rstrip("\n").encode("utf-8", errors="replace") + b"\n"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # the job's last line had no newline
            os.write(fd, data)
        finally:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
