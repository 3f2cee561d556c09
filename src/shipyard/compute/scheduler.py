"""The admission policy of the local executor: pure, no I/O, no clock.

Given what the machine has, what the running jobs hold and what is queued, decide which queued jobs
start now and which GPU indices each gets. The service (``compute.jobs.tick``) loads the inputs in
one short transaction under the ``scheduler`` lock and applies the decision there.

Policy: **strict priority, first come first served within a priority, no backfill.**

- Queued jobs are taken in order of priority (highest first), then age (oldest first), then id.
- A job is admitted while its CPUs, memory and GPUs fit in what is still free; the sum of all
  allocations never exceeds the capacity.
- The first job that does not fit *blocks* every job behind it, even small ones that would fit.
  This is what keeps a large high-priority job from starving: capacity freed by finishing jobs is
  held for it instead of being taken by a stream of smaller ones (Slurm's backfill avoids the
  waste with runtime estimates, which we do not have). Jobs of lower priority wait for as long
  as higher-priority work keeps arriving; that is the meaning of priority here.
- A job that could not run even on the empty machine is reported as unschedulable and does not
  block anyone; the service fails it with the reason instead of letting it queue forever.
- GPUs are whole devices; a job gets the lowest free indices, never one that another job holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

# CPUs are fractional (0.5 CPU); sums of floats such as 0.1 + 0.2 must still fit in 0.3.
_EPSILON = 1e-9


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """What the executor may hand out on this machine."""

    cpus: float
    memory_mb: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """What one running job holds."""

    job_id: str
    cpus: float
    memory_mb: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Request:
    """What one queued job asks for, with the keys that order the queue."""

    job_id: str
    cpus: float
    memory_mb: int
    gpus: int = 0
    priority: int = 0
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class Admission:
    job_id: str
    gpus: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Rejection:
    job_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Admitted jobs in queue order; unschedulable ones with the reason; the first blocked one."""

    admitted: list[Admission] = field(default_factory=list)
    unschedulable: list[Rejection] = field(default_factory=list)
    blocked: str | None = None


def schedule(
    *, capacity: Capacity, running: Sequence[Allocation], queued: Sequence[Request]
) -> Decision:
    """Decide which queued jobs start now (see the module docstring for the policy)."""
    free_cpus = capacity.cpus - sum(a.cpus for a in running)
    free_memory = capacity.memory_mb - sum(a.memory_mb for a in running)
    held = {gpu for a in running for gpu in a.gpus}
    free_gpus = [gpu for gpu in sorted(set(capacity.gpus)) if gpu not in held]

    admitted: list[Admission] = []
    unschedulable: list[Rejection] = []
    blocked: str | None = None
    for request in sorted(queued, key=queue_key):
        reason = never_fits(
            capacity, cpus=request.cpus, memory_mb=request.memory_mb, gpus=request.gpus
        )
        if reason is not None:
            # Reported even behind a blocked job, so that none waits forever for nothing.
            unschedulable.append(Rejection(job_id=request.job_id, reason=reason))
            continue
        if blocked is not None:
            continue
        fits = (
            request.cpus <= free_cpus + _EPSILON
            and request.memory_mb <= free_memory
            and request.gpus <= len(free_gpus)
        )
        if not fits:
            blocked = request.job_id
            continue
        gpus = tuple(free_gpus[: request.gpus])
        del free_gpus[: request.gpus]
        free_cpus -= request.cpus
        free_memory -= request.memory_mb
        admitted.append(Admission(job_id=request.job_id, gpus=gpus))
    return Decision(admitted=admitted, unschedulable=unschedulable, blocked=blocked)


def never_fits(capacity: Capacity, *, cpus: float, memory_mb: int, gpus: int) -> str | None:
    """Why a request could not run even on the empty machine, or None when it could."""
    problems: list[str] = []
    if cpus > capacity.cpus + _EPSILON:
        problems.append(f"{_number(cpus)} CPUs (this machine has {_number(capacity.cpus)})")
    if memory_mb > capacity.memory_mb:
        problems.append(f"{memory_mb} MB of memory (this machine has {capacity.memory_mb} MB)")
    if gpus > len(capacity.gpus):
        problems.append(f"{gpus} GPUs (this machine has {len(capacity.gpus)})")
    if not problems:
        return None
    return "the job asks for " + " and ".join(problems)


def queue_key(request: Request) -> tuple[int, datetime, str]:
    """Priority first (highest first), then age (oldest first), then id for a stable order."""
    return (-request.priority, request.created_at, request.job_id)


def _number(value: float) -> str:
    return f"{value:g}"
