"""Managed device enrollment: operator-issued tokens that agents exchange for a device
credential at Register (docs/security.md "Device enrollment").

A token is ``elen_<id>_<secret>``; only the SHA-256 of the whole string is stored (the
secret is 256 random bits, so a fast hash is enough) and the secret is shown once, at
creation. Each token has an expiry, a maximum number of uses and the tags it grants.
Consuming a use is one conditional ``UPDATE``: of two registrations racing for the last use
exactly one wins, on SQLite and PostgreSQL alike. A refused registration changes nothing.

A hardware id is not a secret, so holding a token must not let anyone take over a device
that is already enrolled: re-registering one (which rotates its credential) needs the token
that enrolled it or a token created with ``reenroll``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from server.db.base import utcnow
from server.db.models import Device, Enrollment, EnrollmentToken
from server.domain import devices as D
from server.domain.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)

PREFIX = "elen_"
DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=366)
MIN_TTL = timedelta(minutes=1)
DEFAULT_MAX_USES = 1
MAX_USES_LIMIT = 1_000_000
_TOKEN = re.compile(r"elen_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
CREATE_HINT = ("an operator must create one: `edgeloop server enrollment create --name NAME` "
               "or POST /api/v1/enrollment-tokens")
STATUSES = ("active", "expired", "revoked", "used_up")
TAKEOVER_REFUSED = ("hardware id already enrolled; re-enrolling it needs the token that enrolled it "
                    "or a token created with --reenroll")


def secret_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def as_utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (one number and unit)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        raise InvalidArgumentError(f"duration must be a number and one of s, m, h, d, w (e.g. 7d), got {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def status(token: EnrollmentToken, now: datetime | None = None) -> str:
    """One of :data:`STATUSES`; revocation wins over expiry, expiry over use count."""
    if token.revoked_at is not None:
        return "revoked"
    if as_utc(token.expires_at) <= (now or utcnow()):
        return "expired"
    if token.uses >= token.max_uses:
        return "used_up"
    return "active"


@dataclass(frozen=True)
class IssuedToken:
    token: EnrollmentToken
    secret: str  # the full ``elen_...`` string: shown once, never stored


def create_token(session: Session, *, name: str, tags: list[str] | None = None,
                 max_uses: int = DEFAULT_MAX_USES, expires_in: timedelta = DEFAULT_TTL,
                 reenroll: bool = False, now: datetime | None = None) -> IssuedToken:
    """A new token; ``reenroll`` lets it also re-register devices other tokens enrolled."""
    name = name.strip()
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidArgumentError("name must be 1 to 64 printable characters")
    if isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_USES_LIMIT:
        raise InvalidArgumentError(f"max_uses must be in [1, {MAX_USES_LIMIT}], got {max_uses}")
    if not MIN_TTL <= expires_in <= MAX_TTL:
        raise InvalidArgumentError(f"expiry must be between {MIN_TTL} and {MAX_TTL.days} days from now")
    if not isinstance(reenroll, bool):
        raise InvalidArgumentError(f"reenroll must be true or false, got {reenroll!r}")
    token_id = secrets.token_hex(8)
    secret = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    now = now or utcnow()
    row = EnrollmentToken(id=token_id, name=name, secret_hash=secret_hash(secret),
                          tags=D.validate_tags(list(tags or [])), max_uses=max_uses, uses=0,
                          created_at=now, expires_at=now + expires_in, reenroll=reenroll)
    session.add(row)
    session.flush()
    return IssuedToken(row, secret)


def list_tokens(session: Session) -> list[EnrollmentToken]:
    return list(session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at, EnrollmentToken.id)))


def get_token(session: Session, token_id: str) -> EnrollmentToken:
    row = session.get(EnrollmentToken, token_id)
    if row is None:
        raise NotFoundError(f"enrollment token {token_id!r} not found")
    return row


def revoke_token(session: Session, token_id: str, now: datetime | None = None) -> EnrollmentToken:
    """Refuse the token from now on (idempotent: a second revoke keeps the first time).
    Devices it enrolled keep their credentials; revoke those devices separately."""
    row = get_token(session, token_id)
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.flush()
    return row


def verify(session: Session, presented: str, now: datetime | None = None) -> EnrollmentToken:
    """The token ``presented`` names, if it may enrol right now (uses are checked when one is
    consumed). UNAUTHENTICATED for a missing, malformed or unknown token, PERMISSION_DENIED
    for a revoked or expired one."""
    if not presented:
        raise UnauthenticatedError(f"missing enrollment token; {CREATE_HINT}")
    m = _TOKEN.fullmatch(presented)
    row = session.get(EnrollmentToken, m.group(1)) if m else None
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash(presented)):
        if not any_active(session, now):
            raise UnauthenticatedError(f"invalid enrollment token: this server has no active enrollment token; "
                                       f"{CREATE_HINT}")
        raise UnauthenticatedError("invalid enrollment token")
    state = status(row, now)
    if state in ("revoked", "expired"):
        raise PermissionDeniedError(f"enrollment token {row.id} is {state}; ask an operator for a new one")
    return row


def any_active(session: Session, now: datetime | None = None) -> bool:
    """Whether some token could enrol a device now (unrevoked, unexpired, uses left)."""
    n = session.scalar(select(func.count()).select_from(EnrollmentToken).where(
        EnrollmentToken.revoked_at.is_(None), EnrollmentToken.expires_at > (now or utcnow()),
        EnrollmentToken.uses < EnrollmentToken.max_uses))
    return bool(n)


def consume(session: Session, token: EnrollmentToken, hardware_id: str, now: datetime | None = None) -> bool:
    """Count ``hardware_id`` against ``token``; True when a use was consumed, False when this
    token had already enrolled it (a device re-registering after losing its credential).
    The conditional UPDATE is what makes the last use go to exactly one of two racing
    registrations (PostgreSQL re-checks the WHERE after the row lock; SQLite serialises
    writers)."""
    if session.get(Enrollment, (token.id, hardware_id)) is not None:
        return False
    now = now or utcnow()
    result: CursorResult = session.execute(  # type: ignore[assignment] # an UPDATE gives a CursorResult
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token.id, EnrollmentToken.revoked_at.is_(None),
               EnrollmentToken.expires_at > now, EnrollmentToken.uses < EnrollmentToken.max_uses)
        .values(uses=EnrollmentToken.uses + 1)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.refresh(token)
        state = status(token, now)
        raise PermissionDeniedError(f"enrollment token {token.id} is "
                                    f"{'used up' if state in ('active', 'used_up') else state}; "
                                    "ask an operator for a new one")
    session.add(Enrollment(token_id=token.id, hardware_id=hardware_id, created_at=now))
    session.flush()
    session.refresh(token)
    return True


def check_may_reregister(session: Session, token: EnrollmentToken, hardware_id: str) -> None:
    """PERMISSION_DENIED when ``hardware_id`` names a device ``token`` may not re-register:
    it exists, ``token`` did not enrol it and is no ``reenroll`` token. Checked before any
    credential is issued. A revoked device is left to register_device, which refuses it."""
    device = session.scalars(select(Device).where(Device.hardware_id == hardware_id.strip())).first()
    if device is None or device.revoked or token.reenroll:
        return
    if session.get(Enrollment, (token.id, device.hardware_id)) is None:
        raise PermissionDeniedError(TAKEOVER_REFUSED)


def register(session: Session, *, enrollment_token: str, hardware_id: str, name: str = "",
             tags: list[str] | None = None, hardware: dict[str, str] | None = None,
             agent_version: str = "", now: datetime | None = None) -> D.Registration:
    """Register (or re-register) a device with an enrollment token: the device gets the
    token's tags on top of those it asks for. Everything happens in the caller's
    transaction, so any refusal (raised) leaves no device row and no use consumed once the
    caller rolls back (server.db.engine.transaction does). An already-enrolled hardware id
    is re-registered only with the token that enrolled it or a ``reenroll`` token."""
    token = verify(session, enrollment_token, now)
    check_may_reregister(session, token, hardware_id)
    reg = D.register_device(session, hardware_id=hardware_id, name=name,
                            tags=list(tags or []) + list(token.tags or []), hardware=hardware,
                            agent_version=agent_version)
    consume(session, token, reg.device.hardware_id, now)
    return reg
