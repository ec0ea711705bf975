"""The audit log of mutating operator calls (server/api/audit.py writes it). Admin only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.api.deps import SessionDep, require_scope
from server.api.errors import responses
from server.api.pagination import DEFAULT_LIMIT, AuditOffset, LimitParam
from server.api.schemas import AuditEventPublic, AuditEventsPublic, UtcDatetime
from server.domain import audit

router = APIRouter(prefix="/audit", tags=["audit"], responses=responses(401, 403, 422))


@router.get("", response_model=AuditEventsPublic, dependencies=[require_scope("admin")])
def list_audit_events(
    session: SessionDep,
    token: Annotated[str | None, Query(max_length=64, description="Only calls made with this token (id or name; 'anonymous' too).")] = None,
    action: Annotated[str | None, Query(max_length=128, description="Only this operation id, e.g. rounds-create_round.")] = None,
    since: Annotated[UtcDatetime | None, Query(description="Only events at or after this time (ISO 8601).")] = None,
    until: Annotated[UtcDatetime | None, Query(description="Only events before this time (ISO 8601).")] = None,
    offset: AuditOffset = 0,
    limit: LimitParam = DEFAULT_LIMIT,
) -> AuditEventsPublic:
    """Mutating calls (refused ones included), newest first."""
    rows, count = audit.list_events(session, token=token, action=action, since=since, until=until,
                                    offset=offset, limit=limit)
    return AuditEventsPublic(data=[AuditEventPublic.model_validate(r) for r in rows], count=count)
