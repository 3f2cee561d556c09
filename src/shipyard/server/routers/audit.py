"""The audit log (``/audit``): hash-chained events, oldest first, paged by ``after`` (a seq)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from shipyard.domain.models import AuditEvent
from shipyard.security import audit as audit_log
from shipyard.server.deps import API_PREFIX, Ctx

router = APIRouter(prefix=f"{API_PREFIX}/audit", tags=["audit"])


@router.get("")
def list_events(
    ctx: Ctx,
    after: Annotated[int, Query(ge=0, description="Only events with a larger seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AuditEvent]:
    return audit_log.list_audit_events(ctx, after=after, limit=limit)
