"""Small queries every service needs: project lookup and lineage edges."""

from __future__ import annotations

import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from shipyard.domain.models import LineageEdge
from shipyard.domain.names import validate_name
from shipyard.errors import NotFoundError
from shipyard.store.tables import LineageEdgeRow, ProjectRow, aware, utcnow


def project_id(session: Session, name: str, *, create: bool) -> str:
    """The id of project ``name``; created on first use when ``create`` (write transactions)."""
    validate_name(name, field="project")
    pid = session.scalar(select(ProjectRow.id).where(ProjectRow.name == name))
    if pid is not None:
        return pid
    if not create:
        raise NotFoundError(f"project {name!r} does not exist", field="project")
    row = ProjectRow(id=uuid.uuid4().hex[:16], name=name)
    session.add(row)
    session.flush()
    return row.id


def project_names(session: Session) -> dict[str, str]:
    return dict(session.execute(select(ProjectRow.id, ProjectRow.name)).all())


def add_edge(
    session: Session,
    *,
    source_kind: str,
    source_id: str,
    target_kind: str,
    target_id: str,
    relation: str,
) -> None:
    """Record a lineage edge once (idempotent)."""
    exists = session.scalar(
        select(LineageEdgeRow.id).where(
            LineageEdgeRow.source_kind == source_kind,
            LineageEdgeRow.source_id == source_id,
            LineageEdgeRow.target_kind == target_kind,
            LineageEdgeRow.target_id == target_id,
            LineageEdgeRow.relation == relation,
        )
    )
    if exists is None:
        session.add(
            LineageEdgeRow(
                source_kind=source_kind,
                source_id=source_id,
                target_kind=target_kind,
                target_id=target_id,
                relation=relation,
            )
        )


def edges_of(session: Session, *, kind: str, id: str) -> list[LineageEdge]:
    """Every edge that touches ``(kind, id)``, in either direction."""
    rows = session.scalars(
        select(LineageEdgeRow)
        .where(
            or_(
                (LineageEdgeRow.source_kind == kind) & (LineageEdgeRow.source_id == id),
                (LineageEdgeRow.target_kind == kind) & (LineageEdgeRow.target_id == id),
            )
        )
        .order_by(LineageEdgeRow.id)
    )
    return [
        LineageEdge(
            source_kind=r.source_kind,
            source_id=r.source_id,
            target_kind=r.target_kind,
            target_id=r.target_id,
            relation=r.relation,
            created_at=aware(r.created_at) or utcnow(),
        )
        for r in rows
    ]
