"""The admission policy's inputs and outputs: pure data, no I/O, no clock.

One ``Snapshot`` holds everything a decision needs: the nodes (what each has), the queues (their
quotas, cohorts and weights), the pending jobs and the running jobs (with where they run). A
``Policy`` turns it into a ``Decision``: which pending jobs start now and where, which running jobs
to preempt for whom, and why each pending job that does not start is waiting.

The *same* code runs in two places: ``compute.admission`` (load rows -> decide -> apply, against a
real executor) and ``compute.sim`` (a discrete-event replay of a cluster trace). So nothing here
may read the clock, the database or the environment: ``Snapshot.now`` is the time (seconds, any
epoch - the sim uses trace time), and every duration is in seconds.

Shape (Kueue's): every job belongs to a *queue* (by default its project's); a queue has a nominal
quota of GPUs, CPUs and memory (optionally GPUs per model) and may sit in a *cohort*, whose members
borrow each other's idle nominal quota up to their borrowing limit. Within what quotas allow,
queues share by weighted dominant-resource fairness; priorities order jobs (higher first);
preemptible jobs may be stopped and requeued for higher-priority work or for a queue reclaiming
its lent quota.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

# CPUs and GPU shares are fractional; sums such as 0.1 + 0.2 must still fit in 0.3.
EPSILON = 1e-9

# Named priority classes (Kueue's WorkloadPriorityClass); a job's priority is one of these names
# or any integer in [-1000, 1000].
PRIORITY_CLASSES: Mapping[str, int] = {"low": -100, "normal": 0, "high": 100, "critical": 1000}

# After this many preemptions a job is no longer chosen as a victim: it runs to its end
# unpreemptible (it is never failed for having been preempted).
MAX_PREEMPTIONS = 3

Packing = Literal["nodes", "count"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    index: int  # the device index on its node (CUDA_VISIBLE_DEVICES)
    model: str = ""  # e.g. "NVIDIA H100 80GB HBM3", or a declared name such as "A100"
    memory_mb: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    id: str
    cpus: float
    memory_mb: int
    gpus: tuple[Gpu, ...] = ()
    healthy: bool = True  # an unhealthy node gets no new work; what runs there is the executor's


@dataclass(frozen=True, slots=True, kw_only=True)
class Quota:
    """An amount of each resource; ``None`` in a field means unlimited."""

    gpus: float | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    # GPUs per model name (matched like ``Demand.gpu_type``); models not named fall under ``gpus``.
    gpus_by_model: Mapping[str, float] = field(default_factory=dict)


UNLIMITED = Quota()


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    name: str
    nominal: Quota = UNLIMITED
    cohort: str | None = None
    # How much more than ``nominal`` the queue may take from its cohort's idle quota.
    borrowing_limit: Quota = UNLIMITED
    weight: float = 1.0  # its fair-share weight (DRF shares are divided by it)


@dataclass(frozen=True, slots=True, kw_only=True)
class Demand:
    """What ONE worker asks for; a job of ``workers`` workers asks for that many times it."""

    cpus: float = 1.0
    memory_mb: int = 512
    gpus: int = 0  # whole devices, all on the worker's node
    # A share of one device instead (0 < f < 1, then gpus == 0), with a bound on its memory:
    # shares are packed onto devices without their sum exceeding 1 or their memory the device's.
    gpu_fraction: float = 0.0
    gpu_memory_mb: int = 0
    gpu_type: str | None = None  # a model name; matched case-insensitively as a substring

    @property
    def gpu_units(self) -> float:
        """GPUs this worker counts against quotas: whole ones, or its fraction."""
        return float(self.gpus) if self.gpus else self.gpu_fraction


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingJob:
    id: str
    queue: str
    demand: Demand
    workers: int = 1  # a gang: all workers start together or none does
    priority: int = 0
    submitted_at: float = 0.0
    max_runtime_s: float | None = None  # the user's bound: backfill's runtime estimate
    preemptible: bool = False
    preemptions: int = 0  # times it has been preempted so far
    attained_gpu_s: float = 0.0  # GPU-seconds it already received (earlier attempts): for LAS
    duration_s: float | None = None  # the true duration: ONLY the simulator's oracle policies


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPlacement:
    node_id: str
    gpus: tuple[int, ...] = ()  # device indices on that node (whole, or the one shared device)
    gpu_share: float = 0.0  # the fraction of ``gpus[0]`` it holds when it asked for a fraction


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    job_id: str
    workers: tuple[WorkerPlacement, ...]  # rank order: workers[0] is rank 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningJob:
    id: str
    queue: str
    demand: Demand
    placement: Placement
    workers: int = 1
    priority: int = 0
    submitted_at: float = 0.0
    started_at: float = 0.0  # when this attempt started
    max_runtime_s: float | None = None
    preemptible: bool = False
    preemptions: int = 0
    attained_gpu_s: float = 0.0  # including this attempt so far
    duration_s: float | None = None  # simulator oracle only
    stopping: bool = False  # already being stopped (cancel or preemption): its capacity frees soon


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    now: float
    nodes: Sequence[Node]
    queues: Mapping[str, QueueConfig]  # a job whose queue is absent here is unlimited
    pending: Sequence[PendingJob]
    running: Sequence[RunningJob]
    # "nodes": every worker on one node, a gang packed onto as few nodes as possible.
    # "count": GPUs counted cluster-wide (the simulator's GPU-count-only rule).
    packing: Packing = "nodes"


@dataclass(frozen=True, slots=True, kw_only=True)
class Preemption:
    job_id: str  # the victim
    for_job: str  # the pending job it makes room for
    reason: str  # e.g. "preempted for job 3f2a (priority high)" / "queue nlp reclaims its quota"


@dataclass(slots=True, kw_only=True)
class Decision:
    # Jobs to start now, in the order they were chosen.
    admit: list[Placement] = field(default_factory=list)
    # Running jobs to stop and requeue (their capacity is not used by ``admit`` of this decision:
    # the job they make room for starts in a later decision, once they have stopped).
    preempt: list[Preemption] = field(default_factory=list)
    # Every pending job not admitted -> why it waits, as a user reads it, e.g.
    # "waiting: queue vision is at its GPU quota 8/8" or "waiting: 2nd in queue vision, needs
    # 4 GPUs on one node (largest free: 2)". Never an error: it waits.
    waiting: dict[str, str] = field(default_factory=dict)
    # Pending jobs that no node of the cluster could ever hold -> why; the caller fails them.
    unschedulable: dict[str, str] = field(default_factory=dict)
    # Reservations kept for blocked jobs (EASY backfill): job id -> the time it is expected to
    # start; informative (shown by ``shipyard queues show``).
    reserved: dict[str, float] = field(default_factory=dict)


class Policy(Protocol):
    name: str

    def decide(self, snapshot: Snapshot) -> Decision: ...


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one decision.

    A decision over 10,000 pending jobs allocates a few hundred thousand small objects, none of
    them in reference cycles; the collector's passes that these allocations trigger walk the whole
    heap (the server's included) and added up to 20 ms to a 40 ms decision
    (``benchmarks/policy_decision.py``: p90 58 ms with it, 42 ms without). Reference counting
    still frees everything; a pass runs at the next allocation after the decision."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def priority_value(priority: int | str) -> int:
    """An integer priority, or a class name from ``PRIORITY_CLASSES``; ValueError otherwise."""
    if isinstance(priority, int):
        return priority
    text = priority.strip().lower()
    if text in PRIORITY_CLASSES:
        return PRIORITY_CLASSES[text]
    try:
        return int(text)
    except ValueError:
        names = ", ".join(PRIORITY_CLASSES)
        raise ValueError(
            f"priority {priority!r} is neither an integer nor a class ({names})"
        ) from None


def gpu_matches(model: str, wanted: str | None) -> bool:
    """Whether a device of ``model`` satisfies ``--gpu-type wanted``."""
    return wanted is None or wanted.strip().lower() in model.lower()


__all__ = [
    "EPSILON",
    "MAX_PREEMPTIONS",
    "PRIORITY_CLASSES",
    "UNLIMITED",
    "Decision",
    "Demand",
    "Gpu",
    "Node",
    "Packing",
    "PendingJob",
    "Placement",
    "Policy",
    "Preemption",
    "QueueConfig",
    "Quota",
    "RunningJob",
    "Snapshot",
    "WorkerPlacement",
    "gpu_matches",
    "priority_value",
]
