"""Lineage (``/projects/{project}/lineage/{kind}/{id}``): every edge that touches one node of the
project, in either direction."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter

from shipyard.data import lineage as lineage_service
from shipyard.domain.models import LineageEdge
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/lineage",
    tags=["lineage"],
)

Kind = Literal["dataset_version", "run", "model_version", "deployment", "job"]
NodeId = Annotated[str, name_path("The node's id.")]


@router.get("/{kind}/{id}")
def lineage(project: ProjectPath, kind: Kind, id: NodeId, ctx: Ctx) -> list[LineageEdge]:
    return lineage_service.lineage(ctx, kind=kind, id=id, project=project)
