"""The executor seam: launch, observe, stop, logs and inventory for admitted jobs.

shipyard decides *admission* (``compute.policy``: quotas, fair share, priorities, preemption);
the executor does *placement* and *running*: ``local`` (detached supervisor processes on this
machine) or ``ray`` (actors in placement groups on a Ray cluster). ``shipyard.wiring`` maps the URL
(``local``, ``ray://host:port``) to one; nothing else names a concrete executor.

A job stores ``executor`` (the name) and ``executor_ref`` (the JSON ``launch`` returned), never
pids. The admission pipeline (``compute.admission``) calls ``launch`` after it committed the
admission, ``observe`` every step for the jobs it runs, ``stop`` to cancel, time out or preempt.
Every method must be safe to call from any server process (another process may have launched
the job) and must not touch job rows: it reports, the pipeline records.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shipyard.compute.policy.base import Node, Placement
from shipyard.domain.models import JobSpec, JobStatus, JobUsage

StopReason = Literal["cancel", "preempt", "timeout", "lost"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node as ``shipyard nodes`` shows it; ``node`` is what the policy plans with."""

    node: Node
    hostname: str = ""
    address: str = ""  # IP or host the node is reached at (MASTER_ADDR for rank 0 there)
    # "nvml" (read with nvidia-ml-py), "declared" (settings / Ray resources), or "none"
    gpu_source: str = "none"
    labels: Mapping[str, str] = field(default_factory=dict)
    message: str = ""  # why it is unhealthy, when it is


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """Everything an executor needs to start one admitted job (all its workers)."""

    job_id: str
    project: str
    attempt: int  # 1 for the first start; +1 after each preemption/requeue
    spec: JobSpec
    placement: Placement  # the policy's choice; a cluster executor may re-place within it
    code_digest: str | None
    run_id: str | None
    # From a server: the URL jobs reach it at and the job-scoped token (``security.principals``);
    # None in an embedded home (the job then uses the home directly).
    server_url: str | None = None
    token: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What became of a launched job since the last look."""

    job_id: str
    state: Literal["running", "finished", "lost"]
    # finished: the outcome. A job stopped for preemption is finished with ``preempted=True``
    # (the pipeline requeues it); "lost": the executor no longer knows it (node died, process
    # gone) - ``message`` names the node / reason and the pipeline requeues or fails it.
    status: JobStatus | None = None
    exit_code: int | None = None
    usage: JobUsage | None = None
    message: str = ""
    preempted: bool = False
    node_id: str | None = None
    # finished: the artifact paths stored from the job's declared outputs, for the job's record
    # (``records.finish_job(outputs=...)``); None when the executor records them itself (local).
    outputs: list[str] | None = None


class ExecutorUnavailableError(Exception):
    """The executor cannot be reached now (e.g. Ray is down): jobs stay queued with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Executor(abc.ABC):
    name: str  # "local" or "ray": stored in JobRow.executor

    @abc.abstractmethod
    def nodes(self) -> list[NodeInfo]:
        """The cluster's nodes now. Raises ``ExecutorUnavailableError`` when unreachable."""

    @abc.abstractmethod
    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        """Start every worker of the job; returns the JSON executor_ref to store.

        ``ctx`` is the caller's ``shipyard.context.Context`` (typed ``Any`` here so the seam does
        not import the context). Raises ``ExecutorUnavailableError`` when it cannot start it now
        (the job goes back to the queue) and ``shipyard.errors.ShipyardError`` when it never can.
        """

    @abc.abstractmethod
    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        """The state of each job (job id -> its executor_ref); jobs left out are unchanged."""

    @abc.abstractmethod
    def stop(
        self,
        ctx: Any,
        job_id: str,
        ref: Mapping[str, Any],
        *,
        reason: StopReason,
        grace_s: float,
    ) -> None:
        """Ask the job to stop: SIGTERM to every worker, SIGKILL after ``grace_s``. Returns at
        once; the outcome is reported by a later ``observe`` (``preempted`` for "preempt")."""

    @abc.abstractmethod
    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of the job's combined log (every rank, each line prefixed
        ``[rank N] `` for gangs) from ``offset``: ``(data, size so far)``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (e.g. ``ray.shutdown``)."""


def largest_node_text(nodes: Sequence[Node]) -> str:
    """ "the largest node has 16 CPUs, 64000 MB, 8 GPUs" - for "could never fit" errors."""
    if not nodes:
        return "the cluster has no nodes"
    best = max(nodes, key=lambda n: (len(n.gpus), n.cpus, n.memory_mb))
    return (
        f"the largest node ({best.id}) has {best.cpus:g} CPUs, {best.memory_mb} MB of memory "
        f"and {len(best.gpus)} GPUs"
    )


__all__ = [
    "Executor",
    "ExecutorUnavailableError",
    "Launch",
    "NodeInfo",
    "Observation",
    "StopReason",
    "largest_node_text",
]
