"""Lineage: the graph of dataset versions, runs, model versions and deployments.

Edges are written by the services that create the facts (a run reading a dataset version, a
registered model coming out of a run, a deployment serving a model version); this module reads
the graph back for the API, the SDK and, later, erasure requests that must follow it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.models import LineageEdge
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security.rbac import authorize_resource
from shipyard.store.queries import edges_of
from shipyard.store.tables import (
    DatasetRow,
    DatasetVersionRow,
    DeploymentRow,
    JobRow,
    ModelRow,
    ModelVersionRow,
    ProjectRow,
    RunRow,
)

KINDS = ("dataset_version", "run", "model_version", "deployment", "job")


def lineage(ctx: Context, *, kind: str, id: str, project: str | None = None) -> list[LineageEdge]:
    """Every edge that touches ``(kind, id)``, in either direction, oldest first.

    The node must exist (in ``project`` when given) and the caller must be able to view its
    project; otherwise it is reported missing.
    """
    if kind not in KINDS:
        raise InvalidInputError(f"kind {kind!r} is not one of {', '.join(KINDS)}", field="kind")
    missing = NotFoundError(f"{kind} {id!r} does not exist", field="id")
    with ctx.db.read() as s:
        owner = _node_project(s, kind, id)
        if owner is None:
            if project is not None:
                authorize_resource(
                    ctx, project=project, given=project, need=Role.VIEWER, missing=missing
                )
            raise missing
        authorize_resource(ctx, project=owner, given=project, need=Role.VIEWER, missing=missing)
        return edges_of(s, kind=kind, id=id)


def _node_project(s: Session, kind: str, id: str) -> str | None:
    """The name of the project that node ``(kind, id)`` belongs to, or ``None`` if none does."""
    query: Any
    if kind == "dataset_version":
        query = (
            select(ProjectRow.name)
            .join(DatasetRow, DatasetRow.project_id == ProjectRow.id)
            .join(DatasetVersionRow, DatasetVersionRow.dataset_id == DatasetRow.id)
            .where(DatasetVersionRow.id == id)
        )
    elif kind == "model_version":
        query = (
            select(ProjectRow.name)
            .join(ModelRow, ModelRow.project_id == ProjectRow.id)
            .join(ModelVersionRow, ModelVersionRow.model_id == ModelRow.id)
            .where(ModelVersionRow.id == id)
        )
    else:
        table = {"run": RunRow, "deployment": DeploymentRow, "job": JobRow}[kind]
        query = (
            select(ProjectRow.name)
            .join(table, table.project_id == ProjectRow.id)  # type: ignore[attr-defined]
            .where(table.id == id)  # type: ignore[attr-defined]
        )
    name: str | None = s.scalar(query)
    return name
