"""Small builders for hand-made policy snapshots (shared by the policy tests)."""

from __future__ import annotations

from collections.abc import Sequence

from shipyard.compute.policy.base import (
    MAX_PREEMPTIONS,
    Decision,
    Demand,
    Gpu,
    Node,
    Packing,
    PendingJob,
    Placement,
    QueueConfig,
    RunningJob,
    Snapshot,
    WorkerPlacement,
)
from shipyard.compute.policy.placement import FreeCapacity


def node(
    node_id: str,
    *,
    gpus: int = 8,
    cpus: float = 64,
    memory_mb: int = 512_000,
    model: str = "A100",
    gpu_memory_mb: int = 80_000,
    healthy: bool = True,
) -> Node:
    return Node(
        id=node_id,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=tuple(Gpu(index=i, model=model, memory_mb=gpu_memory_mb) for i in range(gpus)),
        healthy=healthy,
    )


def nodes(count: int, **kwargs: object) -> list[Node]:
    return [node(f"n{i}", **kwargs) for i in range(count)]  # type: ignore[arg-type]


def pending(
    job_id: str,
    *,
    queue: str = "q",
    gpus: int = 0,
    cpus: float = 1,
    memory_mb: int = 1000,
    workers: int = 1,
    priority: int = 0,
    submitted_at: float = 0.0,
    max_runtime_s: float | None = None,
    preemptible: bool = False,
    preemptions: int = 0,
    attained_gpu_s: float = 0.0,
    gpu_fraction: float = 0.0,
    gpu_memory_mb: int = 0,
    gpu_type: str | None = None,
) -> PendingJob:
    return PendingJob(
        id=job_id,
        queue=queue,
        demand=Demand(
            cpus=cpus,
            memory_mb=memory_mb,
            gpus=gpus,
            gpu_fraction=gpu_fraction,
            gpu_memory_mb=gpu_memory_mb,
            gpu_type=gpu_type,
        ),
        workers=workers,
        priority=priority,
        submitted_at=submitted_at,
        max_runtime_s=max_runtime_s,
        preemptible=preemptible,
        preemptions=preemptions,
        attained_gpu_s=attained_gpu_s,
    )


def running(
    job_id: str,
    at: Sequence[tuple[str, Sequence[int]]] | str,
    *,
    queue: str = "q",
    gpus: int | None = None,
    cpus: float = 1,
    memory_mb: int = 1000,
    priority: int = 0,
    started_at: float = 0.0,
    submitted_at: float = 0.0,
    max_runtime_s: float | None = None,
    preemptible: bool = False,
    preemptions: int = 0,
    attained_gpu_s: float = 0.0,
    gpu_fraction: float = 0.0,
    gpu_memory_mb: int = 0,
    stopping: bool = False,
) -> RunningJob:
    """A running job; ``at`` is [(node, gpu indices)] per worker, or one node id (no GPUs)."""
    where = [(at, ())] if isinstance(at, str) else list(at)
    per_worker = gpus if gpus is not None else (len(where[0][1]) if not gpu_fraction else 0)
    workers = tuple(
        WorkerPlacement(node_id=n, gpus=tuple(g), gpu_share=gpu_fraction) for n, g in where
    )
    return RunningJob(
        id=job_id,
        queue=queue,
        demand=Demand(
            cpus=cpus,
            memory_mb=memory_mb,
            gpus=per_worker,
            gpu_fraction=gpu_fraction,
            gpu_memory_mb=gpu_memory_mb,
        ),
        placement=Placement(job_id=job_id, workers=workers),
        workers=len(workers),
        priority=priority,
        submitted_at=submitted_at,
        started_at=started_at,
        max_runtime_s=max_runtime_s,
        preemptible=preemptible,
        preemptions=preemptions,
        attained_gpu_s=attained_gpu_s,
        stopping=stopping,
    )


def as_running(job: PendingJob, placement: Placement, *, started_at: float = 0.0) -> RunningJob:
    """The running job a pending one becomes once admitted at ``placement``."""
    return RunningJob(
        id=job.id,
        queue=job.queue,
        demand=job.demand,
        placement=placement,
        workers=job.workers,
        priority=job.priority,
        submitted_at=job.submitted_at,
        started_at=started_at,
        max_runtime_s=job.max_runtime_s,
        preemptible=job.preemptible,
        preemptions=job.preemptions,
        attained_gpu_s=job.attained_gpu_s,
    )


def snapshot(
    ns: Sequence[Node],
    pend: Sequence[PendingJob] = (),
    run: Sequence[RunningJob] = (),
    *,
    queues: Sequence[QueueConfig] = (),
    now: float = 0.0,
    packing: Packing = "nodes",
) -> Snapshot:
    return Snapshot(
        now=now,
        nodes=list(ns),
        queues={q.name: q for q in queues},
        pending=list(pend),
        running=list(run),
        packing=packing,
    )


def admitted(decision: Decision) -> list[str]:
    return [p.job_id for p in decision.admit]


def check_consistent(snap: Snapshot, decision: Decision) -> None:
    """Every pending job is admitted, waiting or unschedulable (exactly one); nothing admitted
    oversubscribes a node; victims are preemptible running jobs, each once."""
    pending_ids = [j.id for j in snap.pending]
    outcomes = admitted(decision) + list(decision.waiting) + list(decision.unschedulable)
    assert sorted(outcomes) == sorted(pending_ids), "each pending job gets one outcome"
    by_id = {j.id: j for j in snap.pending}
    free = FreeCapacity.of(snap)
    for p in decision.admit:
        job = by_id[p.job_id]
        assert free.can_take(job, p, packing=snap.packing), f"{p.job_id} does not fit"
        free.take(job, p, packing=snap.packing)
        if snap.packing == "nodes":
            assert len(p.workers) == job.workers
    running = {r.id: r for r in snap.running}
    victims = [v.job_id for v in decision.preempt]
    assert len(victims) == len(set(victims))
    for v in victims:
        r = running[v]
        assert r.preemptible and not r.stopping and r.preemptions < MAX_PREEMPTIONS
