"""Process helpers for the local executor: liveness that survives pid reuse, usage, killing.

A job's processes are found two ways, because either alone can miss some: the process tree under
the job's leader (its own process group), and every process whose environment carries the job's
``SHIPYARD_JOB_ID`` (which catches children that left the group with ``setsid`` and were
re-parented). A process group is signalled only when a process verified to belong to the job still
holds it, so a reused pid never gets someone else's group killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import psutil

from shipyard.settings import ENV_JOB_ID

# A process's create_time is computed the same way by every reader, so equal means "same process".
_CREATE_TIME_TOLERANCE_S = 0.05


def process_alive(pid: int, create_time: float | None) -> bool:
    """True while process ``pid`` runs and is the one that started at ``create_time``.

    A zombie counts as dead; a process we may not inspect counts as alive (we cannot tell).
    """
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > (
            _CREATE_TIME_TOLERANCE_S
        ):
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def create_time(pid: int | None = None) -> float | None:
    """The start time of process ``pid`` (this process by default); None when it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


@dataclass
class UsageMeter:
    """Peak memory and CPU time of a process tree, sampled while it runs.

    Peak memory is the largest RSS summed over the tree at one sample, or the largest high-water
    mark (``VmHWM``, kept by the kernel since ``exec``) of any one process when that is higher:
    the high-water mark catches a spike between two samples.
    """

    cpu_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    samples: int = 0
    # Memory the whole tree holds at the last sample: the sum of proportional set sizes (a page
    # that forked processes share counts once), or the RSS of a lone process.
    resident_mb: float = 0.0

    def sample(self, leader: int) -> None:
        procs = _tree(leader)
        cpu = 0.0
        rss = 0
        pss = 0
        hwm = 0
        seen = False
        for proc in procs:
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue  # its memory is gone; its CPU time shows up in rusage
                    times = proc.cpu_times()
                    memory = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            # children_* hold descendants that ended and were waited for; they are no longer in
            # the tree, so nothing is counted twice.
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += memory
            pss += _proportional(proc, memory) if len(procs) > 1 else memory
            hwm = max(hwm, high_water_mark(proc.pid))
            seen = True
        if not seen:
            return
        self.samples += 1
        self.resident_mb = pss / (1024 * 1024)
        self.cpu_seconds = max(self.cpu_seconds, cpu)
        self.peak_memory_mb = max(self.peak_memory_mb, max(rss, hwm) / (1024 * 1024))


def _proportional(proc: psutil.Process, rss: int) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.Error, AttributeError, OSError):
        return rss


def job_processes(job_id: str, leader: int | None) -> list[psutil.Process]:
    """Every live process that belongs to job ``job_id`` (see the module docstring)."""
    found: dict[int, psutil.Process] = {}
    if leader is not None:
        try:
            proc = psutil.Process(leader)
            if _belongs(proc, job_id):
                for member in [proc, *proc.children(recursive=True)]:
                    found[member.pid] = member
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in psutil.process_iter():
        if proc.pid not in found and _belongs(proc, job_id):
            found[proc.pid] = proc
    protected = _self_and_ancestors()
    return [proc for pid, proc in sorted(found.items()) if pid not in protected]


def kill_job(job_id: str, leader: int | None, *, grace: float) -> int:
    """SIGTERM the job's processes (and group), SIGKILL what is left after ``grace`` seconds.

    Returns how many processes were found. Safe to call when nothing is left.
    """
    procs = job_processes(job_id, leader)
    if not procs:
        return 0
    groups = _groups(procs, leader)
    _signal(procs, groups, signal.SIGTERM)
    alive = _wait_gone(procs, timeout=grace)
    if alive:
        _signal(alive, groups, signal.SIGKILL)
        _wait_gone(alive, timeout=grace)
    # Children forked while we were signalling: one more sweep, without mercy.
    late = job_processes(job_id, leader)
    if late:
        _signal(late, _groups(late, leader), signal.SIGKILL)
        _wait_gone(late, timeout=grace)
    return len(procs)


def high_water_mark(pid: int) -> int:
    """Peak RSS in bytes of one process since its exec (Linux); 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait_gone(procs: list[psutil.Process], *, timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; the ones still running after ``timeout``.

    A zombie counts as gone: a process that is not our child may stay one for as long as its
    new parent (often a container's init) does not reap it.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [proc for proc in procs if _running(proc)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _belongs(proc: psutil.Process, job_id: str) -> bool:
    try:
        return bool(proc.environ().get(ENV_JOB_ID) == job_id)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def _tree(leader: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(leader)
        pids = descendants(leader)
        if pids is None:
            return [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    procs = [proc]
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            procs.append(psutil.Process(pid))
    return procs


def children(pid: int) -> list[int] | None:
    """The pids of ``pid``'s children, from ``/proc/PID/task/*/children`` (each thread's); None
    when this kernel has no such files (``CONFIG_PROC_CHILDREN``) or ``pid`` is gone.

    psutil finds children by reading every process's ``/proc/N/stat``: 4 ms of CPU with 80
    processes on the machine, per call - the watch of a gang made several a look. This reads a
    file per thread of ``pid`` only. A child forked while we read may be missed (the kernel's
    caveat); the next look sees it."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.extend(int(word) for word in f.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/{pid}/task/{task}"):
                return None  # the thread is there, its children file is not: no support
        except (OSError, ValueError):
            continue  # the thread ended while we read
    return found


def descendants(pid: int) -> list[int] | None:
    """Every descendant of ``pid`` (breadth first), or None when ``children`` cannot tell."""
    out: list[int] = []
    frontier = [pid]
    seen = {pid}
    while frontier:
        nxt: list[int] = []
        for parent in frontier:
            kids = children(parent)
            if kids is None:
                if parent == pid:
                    return None
                continue  # it ended while we walked
            for kid in kids:
                if kid not in seen:
                    seen.add(kid)
                    out.append(kid)
                    nxt.append(kid)
        frontier = nxt
    return out


def _groups(procs: Iterable[psutil.Process], leader: int | None) -> set[int]:
    """The leader's process group, when a verified job process still holds it (else none)."""
    if leader is None or leader == os.getpgid(0):
        return set()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == leader:
                return {leader}
    return set()


def _signal(procs: Iterable[psutil.Process], groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _self_and_ancestors() -> set[int]:
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(parent.pid for parent in psutil.Process().parents())
    return pids


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A job's processes whose parent exits are then re-parented to us instead of to init, so we
    can wait for them and their CPU time lands in our ``RUSAGE_CHILDREN``. False where the OS
    does not offer it.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_orphans(*, keep: int | Collection[int] | None = None) -> int:
    """Wait for every exited child of ours but ``keep`` (the job's leader or a gang's workers,
    which their ``Popen`` waits for); returns how many were reaped."""
    kept = {keep} if isinstance(keep, int) else set(keep or ())
    reaped = 0
    pids = children(os.getpid())
    procs: list[psutil.Process] = []
    if pids is None:
        try:
            procs = psutil.Process().children()
        except psutil.Error:
            return 0
    for pid in pids or ():
        if pid not in kept:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    for child in procs:
        if child.pid in kept:
            continue
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
        with contextlib.suppress(ChildProcessError, OSError):
            pid, _ = os.waitpid(child.pid, os.WNOHANG)
            reaped += pid != 0
    return reaped


_PR_SET_CHILD_SUBREAPER = 36
