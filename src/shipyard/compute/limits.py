"""Enforcing a job's memory and CPU requests, where the OS lets us.

``plan_limits`` picks, per job, the strongest mechanism this machine offers:

- **cgroup v2** (``/sys/fs/cgroup`` is the unified hierarchy and we may create cgroups with the
  ``memory`` and ``cpu`` controllers): the job runs in its own cgroup with ``memory.max`` (and no
  swap) and ``cpu.max`` set to its request; the kernel kills it when it goes over its memory
  (``memory.events`` counts the kill) and accounts the CPU time of every process in it.
- **fallback** (cgroup v1 or hybrid machines, unprivileged containers): ``RLIMIT_AS`` bounds
  every process of the job. Address space is not memory - threads and allocator arenas reserve
  much more than they touch (``import torch`` alone reserves ~640 MB) - so the bound is the
  request plus headroom (``as_limit_mb``: twice the request, at least 1 GiB more), and an
  allocation past it fails at once with ``MemoryError``/``ENOMEM``; the resident-memory watch
  below enforces the request itself. GPU jobs get no ``RLIMIT_AS``: CUDA reserves far more
  address space than it uses, so the limit would break them.

Either way the job is pinned (``sched_setaffinity``) to ``ceil(cpus)`` of our cores, so it sees
only those in ``os.sched_getaffinity`` and sizes its thread pools to them, and the supervisor
stops a job whose processes together hold more resident memory than it asked for. What applied
is described in one line, recorded on the job as ``Job.enforcement``.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_GROUP = "shipyard-jobs"
CPU_PERIOD_US = 100_000
AS_HEADROOM_MB = 1024
# Words in a log tail that say an allocation failed (Python, glibc, C++, PyTorch).
_OOM_WORDS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


@dataclass(frozen=True, kw_only=True)
class Limits:
    memory_mb: int
    cpus: float
    cores: tuple[int, ...] | None  # the CPUs the job is pinned to; None when affinity failed
    cgroup: Path | None  # the job's own cgroup v2 folder
    rlimit_as: int | None  # bytes of address space per process, in the fallback
    description: str

    @property
    def mechanism(self) -> str:
        return "cgroup v2" if self.cgroup is not None else "rlimit"


def plan_limits(
    *, job_id: str, cpus: float, memory_mb: int, gpus: int, cgroups: Path = CGROUP_ROOT
) -> Limits:
    """The limits for one job (creating its cgroup when cgroup v2 can be used)."""
    cores = _pick_cores(job_id, cpus)
    cgroup = _make_cgroup(cgroups, job_id, cpus=cpus, memory_mb=memory_mb)
    rlimit_as = None
    parts: list[str] = []
    if cgroup is not None:
        parts.append(f"cgroup v2: memory.max {memory_mb} MB, cpu.max {cpus:g} cpus")
    elif gpus > 0:
        parts.append(
            "memory: no cgroup v2 here, and RLIMIT_AS would break CUDA, so only the "
            "supervisor's resident-memory watch applies"
        )
    else:
        rlimit_as = as_limit_mb(memory_mb) * MiB
        parts.append(
            f"rlimit: RLIMIT_AS {as_limit_mb(memory_mb)} MB of address space for {memory_mb} MB "
            "(no cgroup v2 here); resident memory watched by the supervisor"
        )
    total = len(_allowed_cores())
    if cores is not None:
        parts.append(f"affinity: {len(cores)} of {total} cpus")
    else:
        parts.append("affinity: not available")
    return Limits(
        memory_mb=memory_mb,
        cpus=cpus,
        cores=cores,
        cgroup=cgroup,
        rlimit_as=rlimit_as,
        description="; ".join(parts),
    )


def as_limit_mb(memory_mb: int) -> int:
    """The address-space bound of the fallback for a request of ``memory_mb``."""
    return memory_mb + max(AS_HEADROOM_MB, memory_mb)


def preexec(limits: Limits, *, uid: int | None, gid: int | None) -> Callable[[], None]:
    """What the job's process does between fork and exec: join its cgroup, take its limits,
    then (a root supervisor) become the job user. Privileges go last, since joining a cgroup
    needs them."""

    def apply() -> None:
        if limits.cgroup is not None:
            with open(limits.cgroup / "cgroup.procs", "w") as fh:
                fh.write("0")
        if limits.cores is not None:
            os.sched_setaffinity(0, limits.cores)
        if limits.rlimit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.rlimit_as, limits.rlimit_as))
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    return apply


def cgroup_cpu_seconds(limits: Limits) -> float | None:
    """CPU time of every process that ran in the job's cgroup (None without one)."""
    if limits.cgroup is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in (limits.cgroup / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    return None


def memory_exceeded(limits: Limits, *, log_tail: str, peak_mb: float) -> bool:
    """Whether a job that failed did so because it hit its memory limit."""
    if limits.cgroup is not None:
        with contextlib.suppress(OSError, ValueError):
            for line in (limits.cgroup / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("oom_kill", "oom") and int(value) > 0:
                    return True
    if limits.rlimit_as is not None or limits.cgroup is not None:
        return any(word in log_tail for word in _OOM_WORDS)
    return peak_mb > limits.memory_mb


def release(limits: Limits) -> None:
    """Remove the job's cgroup once its processes are gone (a no-op without one)."""
    if limits.cgroup is None:
        return
    with contextlib.suppress(OSError):
        (limits.cgroup / "cgroup.kill").write_text("1")
    with contextlib.suppress(OSError):
        limits.cgroup.rmdir()


def memory_message(memory_mb: int, how: str) -> str:
    return (
        f"exceeded its memory limit of {memory_mb} MB ({how}); ask for more memory "
        "(resources.memory_mb) or make the job use less"
    )


# --- helpers -----------------------------------------------------------------------------------


def _allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _pick_cores(job_id: str, cpus: float) -> tuple[int, ...] | None:
    """``ceil(cpus)`` of our cores, starting at a place that depends on the job, so concurrent
    jobs spread over the machine instead of piling onto core 0."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = _allowed_cores()
    count = max(1, min(len(allowed), math.ceil(cpus)))
    start = zlib.crc32(job_id.encode()) % len(allowed)
    return tuple(sorted(allowed[(start + i) % len(allowed)] for i in range(count)))


def _make_cgroup(root: Path, job_id: str, *, cpus: float, memory_mb: int) -> Path | None:
    """Create the job's cgroup under ``<our cgroup's parent>/shipyard-jobs``; None when cgroup v2
    cannot be used here (not unified, controllers missing, no permission)."""
    if not (root / "cgroup.controllers").is_file():
        return None  # cgroup v1 or hybrid: /sys/fs/cgroup is not the unified hierarchy
    own = _own_cgroup(root)
    if own is None:
        return None
    base = own if own == root else own.parent
    group = base / CGROUP_GROUP
    job = group / f"job-{job_id}"
    try:
        _enable(base, ("memory", "cpu"))
        group.mkdir(exist_ok=True)
        _enable(group, ("memory", "cpu"))
        job.mkdir(exist_ok=True)
        (job / "memory.max").write_text(str(memory_mb * MiB))
        with contextlib.suppress(FileNotFoundError):
            (job / "memory.swap.max").write_text("0")
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        (job / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
    except OSError:
        with contextlib.suppress(OSError):
            job.rmdir()
        return None
    return job


def _enable(cgroup: Path, controllers: tuple[str, ...]) -> None:
    enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    missing = [c for c in controllers if c not in enabled]
    if missing:
        (cgroup / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))


def _own_cgroup(root: Path) -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                path = line[3:].strip().lstrip("/")
                return root / path if path else root
    return None
