"""Nodes: what each node of the cluster has, what is allocated there and to which jobs.

The executor says which nodes exist and what they hold (``Executor.nodes()``: the local
executor's one machine, or a Ray cluster's nodes); the RUNNING job rows say what is allocated
where (``placement``: one entry per worker, ``{"node_id", "gpus", "gpu_share"}``). Anyone signed
in may read the nodes; the ids of jobs in projects the caller cannot see are left out (the
amounts allocated count them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from shipyard import wiring
from shipyard.compute.executors.base import ExecutorUnavailableError, NodeInfo
from shipyard.context import Context
from shipyard.domain.models import GpuView, JobStatus, NodeView
from shipyard.errors import InvalidInputError, NotFoundError, ResourceUnavailableError
from shipyard.security.rbac import can_view
from shipyard.store.tables import JobRow, ProjectRow


def list_nodes(ctx: Context) -> list[NodeView]:
    """Every node, by id, with its allocations."""
    infos = executor_nodes(ctx)
    allocations = _allocations(ctx, [info.node.id for info in infos])
    return [_view(info, allocations.get(info.node.id)) for info in infos]


def get_node(ctx: Context, *, node_id: str) -> NodeView:
    if not isinstance(node_id, str) or not node_id:
        raise InvalidInputError("node_id must be a non-empty string", field="node_id")
    infos = executor_nodes(ctx)
    for info in infos:
        if info.node.id == node_id:
            allocations = _allocations(ctx, [node_id])
            return _view(info, allocations.get(node_id))
    known = ", ".join(info.node.id for info in infos) or "none"
    raise NotFoundError(
        f"node {node_id!r} does not exist; the nodes are: {known} (see 'shipyard nodes list')",
        field="node_id",
    )


def executor_nodes(ctx: Context) -> list[NodeInfo]:
    """The executor's nodes now, by id; ResourceUnavailableError when it cannot be reached."""
    try:
        infos = _executor_nodes(ctx)
    except ExecutorUnavailableError as exc:
        raise ResourceUnavailableError(
            f"cannot list the nodes: the executor is unreachable ({exc.reason}); "
            "try again when it is back",
            field="executor",
        ) from None
    return sorted(infos, key=lambda info: info.node.id)


# --- helpers ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Allocated:
    cpus: float = 0.0
    memory_mb: int = 0
    gpus: dict[int, float] = field(default_factory=dict)  # index -> share allocated (1 = whole)
    gpu_jobs: dict[int, list[str]] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)


def _executor_nodes(ctx: Context) -> list[NodeInfo]:
    return list(wiring.open_executor(ctx.settings.executor, ctx.settings).nodes())


def _allocations(ctx: Context, node_ids: Sequence[str]) -> dict[str, _Allocated]:
    """Per node: what the RUNNING jobs hold there (every worker of every job)."""
    default_node = node_ids[0] if len(node_ids) == 1 else None
    out: dict[str, _Allocated] = {}
    with ctx.db.read() as s:
        rows = s.execute(
            select(JobRow, ProjectRow.name)
            .join(ProjectRow, JobRow.project_id == ProjectRow.id)
            .where(JobRow.status == JobStatus.RUNNING.value)
            .order_by(JobRow.started_at, JobRow.id)
        ).all()
        for row, project in rows:
            visible = ctx.principal.server_admin or can_view(ctx.principal, project)
            for worker in _placement(row, default_node):
                node_id = str(worker.get("node_id") or "")
                if not node_id:
                    continue
                alloc = out.setdefault(node_id, _Allocated())
                alloc.cpus += float(row.cpus)
                alloc.memory_mb += int(row.memory_mb)
                share = float(worker.get("gpu_share") or 0.0)
                for index in worker.get("gpus") or ():
                    index = int(index)
                    alloc.gpus[index] = alloc.gpus.get(index, 0.0) + (share or 1.0)
                    if visible:
                        alloc.gpu_jobs.setdefault(index, []).append(row.id)
                if visible and row.id not in alloc.jobs:
                    alloc.jobs.append(row.id)
    return out


def _placement(row: JobRow, default_node: str | None) -> list[Mapping[str, Any]]:
    """The job's workers as placed; rows from before placements (migration 0007) ran on the one
    local node with ``assigned_gpus``."""
    if row.placement:
        return [p for p in row.placement if isinstance(p, Mapping)]
    if default_node is None:
        return []
    return [{"node_id": default_node, "gpus": list(row.assigned_gpus or ()), "gpu_share": 0.0}]


def _view(info: NodeInfo, alloc: _Allocated | None) -> NodeView:
    alloc = alloc or _Allocated()
    node = info.node
    return NodeView(
        id=node.id,
        hostname=info.hostname,
        address=info.address,
        healthy=node.healthy,
        message=info.message,
        gpu_source=info.gpu_source,
        labels=dict(info.labels),
        cpus=node.cpus,
        memory_mb=node.memory_mb,
        gpus=[
            GpuView(
                index=gpu.index,
                model=gpu.model,
                memory_mb=gpu.memory_mb,
                allocated=round(alloc.gpus.get(gpu.index, 0.0), 6),
                jobs=alloc.gpu_jobs.get(gpu.index, []),
            )
            for gpu in node.gpus
        ],
        allocated_cpus=round(alloc.cpus, 6),
        allocated_memory_mb=alloc.memory_mb,
        jobs=alloc.jobs,
    )


__all__ = ["executor_nodes", "get_node", "list_nodes"]
