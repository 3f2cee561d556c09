"""Nodes (``/nodes``): the cluster's nodes, their GPUs, what is allocated and to which jobs.

Thin HTTP over ``shipyard.compute.nodes``; anyone signed in may read them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from shipyard.compute import nodes
from shipyard.domain.models import NodeView
from shipyard.schemas import ErrorBody
from shipyard.server.deps import API_PREFIX, Ctx, name_path

router = APIRouter(
    prefix=f"{API_PREFIX}/nodes",
    tags=["nodes"],
    responses={404: {"model": ErrorBody}, 500: {"model": ErrorBody}},
)

NodeId = Annotated[str, name_path("The node's id (its hostname, or the Ray node id).")]


@router.get("")
def list_nodes(ctx: Ctx) -> list[NodeView]:
    return nodes.list_nodes(ctx)


@router.get("/{node_id}")
def get_node(node_id: NodeId, ctx: Ctx) -> NodeView:
    return nodes.get_node(ctx, node_id=node_id)
