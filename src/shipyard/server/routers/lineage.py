"""Lineage (``/lineage/{kind}/{id}``): every edge that touches one node, in either direction.

There is no lineage service module yet, so this reads through ``store.queries.edges_of`` in one
read transaction; when one exists (``data/lineage.py``), this becomes a one-line call to it.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from shipyard.domain.models import LineageEdge
from shipyard.server.deps import API_PREFIX, Ctx
from shipyard.store.queries import edges_of

router = APIRouter(prefix=f"{API_PREFIX}/lineage", tags=["lineage"])

Kind = Literal["dataset_version", "run", "model_version", "deployment", "job"]


@router.get("/{kind}/{id}")
def lineage(kind: Kind, id: str, ctx: Ctx) -> list[LineageEdge]:
    with ctx.db.read() as s:
        return edges_of(s, kind=kind, id=id)
