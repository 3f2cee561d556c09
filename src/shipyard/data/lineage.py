"""Lineage: the graph of dataset versions, runs, model versions and deployments.

Edges are written by the services that create the facts (a run reading a dataset version, a
registered model coming out of a run, a deployment serving a model version); this module reads
the graph back for the API, the SDK and, later, erasure requests that must follow it.
"""

from __future__ import annotations

from shipyard.context import Context
from shipyard.domain.models import LineageEdge
from shipyard.store.queries import edges_of

KINDS = ("dataset_version", "run", "model_version", "deployment", "job")


def lineage(ctx: Context, *, kind: str, id: str) -> list[LineageEdge]:
    """Every edge that touches ``(kind, id)``, in either direction, oldest first."""
    with ctx.db.read() as s:
        return edges_of(s, kind=kind, id=id)
