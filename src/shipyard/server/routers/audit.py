"""The audit log (``/audit``): keyed, hash-chained events, oldest first, paged by ``after`` (a seq);
``/audit/verify`` checks the whole chain against its key and head anchor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from shipyard.domain.models import AuditEvent, AuditVerification
from shipyard.schemas import MAX_INT64
from shipyard.security import audit as audit_log
from shipyard.server.deps import API_PREFIX, Ctx

router = APIRouter(prefix=f"{API_PREFIX}/audit", tags=["audit"])


@router.get("")
def list_events(
    ctx: Ctx,
    after: Annotated[
        int, Query(ge=0, le=MAX_INT64, description="Only events with a larger seq.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AuditEvent]:
    return audit_log.list_audit_events(ctx, after=after, limit=limit)


@router.get("/verify")
def verify_chain(ctx: Ctx) -> AuditVerification:
    """``ok``, or the first bad seq and what is wrong (altered, removed, truncated, unanchored)."""
    return audit_log.verify_audit_chain(ctx)
