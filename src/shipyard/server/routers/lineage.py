"""Lineage (``/lineage/{kind}/{id}``): every edge that touches one node, in either direction.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from shipyard.data import lineage as lineage_service
from shipyard.domain.models import LineageEdge
from shipyard.server.deps import API_PREFIX, Ctx

router = APIRouter(prefix=f"{API_PREFIX}/lineage", tags=["lineage"])

Kind = Literal["dataset_version", "run", "model_version", "deployment", "job"]


@router.get("/{kind}/{id}")
def lineage(kind: Kind, id: str, ctx: Ctx) -> list[LineageEdge]:
    return lineage_service.lineage(ctx, kind=kind, id=id)
