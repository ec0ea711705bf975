"""The audit log of mutating operator calls: one row per call, begun before the call runs and
completed with its outcome (server/api/audit.py decides when; this module only stores)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import AuditEvent

MAX_PATH = 512
MAX_TARGET = 512
MAX_DETAIL = 1000


@dataclass
class Outcome:
    token_id: str | None
    token_name: str
    action: str
    target: str
    status: int
    detail: str = ""


def begin(factory: sessionmaker[Session], method: str, path: str) -> int:
    """Records that a call started (status null), in its own committed transaction."""
    with transaction(factory) as s:
        event = AuditEvent(at=utcnow(), method=method[:8], path=path[:MAX_PATH])
        s.add(event)
        s.flush()
        return event.id


def finish(factory: sessionmaker[Session], event_id: int, outcome: Outcome) -> None:
    with transaction(factory) as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == event_id).values(
            token_id=outcome.token_id, token_name=outcome.token_name[:64], action=outcome.action[:128],
            target=outcome.target[:MAX_TARGET], status=outcome.status, detail=outcome.detail[:MAX_DETAIL]))


def list_events(
    session: Session, *, token: str | None = None, action: str | None = None,
    since: datetime | None = None, until: datetime | None = None, offset: int = 0, limit: int = 100,
) -> tuple[list[AuditEvent], int]:
    """Events newest first. ``token`` matches a token id or name; ``since`` is inclusive,
    ``until`` exclusive."""
    where = []
    if token is not None:
        where.append((AuditEvent.token_id == token) | (AuditEvent.token_name == token))
    if action is not None:
        where.append(AuditEvent.action == action)
    if since is not None:
        where.append(AuditEvent.at >= since)
    if until is not None:
        where.append(AuditEvent.at < until)
    count = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    rows = session.scalars(select(AuditEvent).where(*where).order_by(AuditEvent.id.desc()).offset(offset).limit(limit))
    return list(rows), count
