"""The hash-chained audit log.

Every mutating service call appends one event, in the same transaction as the change it records,
so the log and the data can never disagree. Each event's hash covers its content and the previous
event's hash; ``verify_chain`` finds the first event that was altered, removed or reordered.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.models import AuditEvent
from shipyard.store.engine import lock
from shipyard.store.tables import AuditEventRow, aware, utcnow

GENESIS = "0" * 64


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    resource: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Append an audit event inside the caller's (write) transaction."""
    lock(session, "audit")
    prev = session.scalar(select(AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1))
    prev_hash = prev or GENESIS
    at = utcnow()
    details = details or {}
    digest = _hash(prev_hash, at, actor, action, resource, details)
    session.add(
        AuditEventRow(
            at=at, actor=actor, action=action, resource=resource, details=details,
            prev_hash=prev_hash, hash=digest,
        )
    )


def list_events(session: Session, *, limit: int = 100, after: int = 0) -> list[AuditEvent]:
    rows = session.scalars(
        select(AuditEventRow)
        .where(AuditEventRow.seq > after)
        .order_by(AuditEventRow.seq)
        .limit(limit)
    )
    return [_to_domain(r) for r in rows]


def verify_chain(session: Session) -> int | None:
    """Return the seq of the first broken event, or None when the whole chain holds."""
    prev_hash = GENESIS
    for row in session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq)):
        at = aware(row.at)
        assert at is not None
        expected = _hash(prev_hash, at, row.actor, row.action, row.resource, row.details)
        if row.prev_hash != prev_hash or row.hash != expected:
            return row.seq
        prev_hash = row.hash
    return None


def _hash(
    prev_hash: str, at: datetime, actor: str, action: str, resource: str, details: dict[str, Any]
) -> str:
    payload = json.dumps(
        [prev_hash, aware(at).isoformat(timespec="microseconds"), actor, action, resource, details],  # type: ignore[union-attr]
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _to_domain(row: AuditEventRow) -> AuditEvent:
    at = aware(row.at)
    assert at is not None
    return AuditEvent(
        seq=row.seq, at=at, actor=row.actor, action=row.action, resource=row.resource,
        details=row.details, prev_hash=row.prev_hash, hash=row.hash,
    )


def list_audit_events(ctx: Context, *, after: int = 0, limit: int = 100) -> list[AuditEvent]:
    """Audit events with ``seq > after``, oldest first: the service behind ``GET /audit``."""
    with ctx.db.read() as s:
        return list_events(s, after=after, limit=limit)
