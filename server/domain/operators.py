"""Operator API tokens: create, list, revoke, authenticate, and the first-start bootstrap.

A token reads ``elop_<id>_<secret>``: ``id`` (12 hex) names it in lists, logs and the audit
log; ``secret`` is 32 random bytes (``secrets.token_urlsafe``). Only the SHA-256 of the whole
token is stored: the secret is high-entropy, so a fast hash is enough (no password stretching
needed) and a database dump reveals no usable credential.

Scopes are hierarchical: ``admin`` can do everything ``operate`` can, which can do everything
``read`` can. A token holds exactly one scope.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import OperatorToken
from server.domain.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError
from server.store.durable import write_private_file

log = logging.getLogger(__name__)

SCOPES = ("read", "operate", "admin")  # in increasing power
TOKEN_PREFIX = "elop_"
TOKEN_RE = re.compile(r"^elop_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
ANONYMOUS = "anonymous"  # the audit log's name for a call without a valid token
BOOTSTRAP_NAME = "bootstrap-admin"
BOOTSTRAP_FILE = "operator-token"
PROVISIONED_ID = "env"  # the row holding EDGELOOP_OPERATOR_TOKEN's hash
PROVISIONED_NAME = "env-admin"
MAX_PRESENTED = 512  # longer credentials are refused before hashing
MAX_EXPIRES_IN = timedelta(days=3650)
LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often per token

MISSING = "missing operator token (header 'Authorization: Bearer <token>')"
INVALID = "invalid operator token"
EXPIRED = "operator token {id} expired at {at}"
REVOKED = "operator token {id} was revoked at {at}"

_DURATION_RE = re.compile(r"^([1-9][0-9]{0,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def scope_allows(have: str, need: str) -> bool:
    """True if a token of scope ``have`` may call a route that needs ``need``."""
    return SCOPES.index(have) >= SCOPES.index(need)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(t: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored value is UTC."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def is_active(token: OperatorToken, now: datetime | None = None) -> bool:
    now = now or utcnow()
    expires = _aware(token.expires_at)
    return token.revoked_at is None and (expires is None or expires > now)


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"`` as a timedelta (at most 10 years)."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise InvalidArgumentError(f"duration must be a positive number and a unit s, m, h, d or w (e.g. 30d), got {text!r}")
    delta = timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    if delta > MAX_EXPIRES_IN:
        raise InvalidArgumentError(f"duration {text!r} exceeds {MAX_EXPIRES_IN.days} days")
    return delta


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgumentError(
            "token name must be 1 to 64 characters: letters, digits, space, '.', '_', '@', '-', starting with a letter or digit"
        )
    if name == ANONYMOUS:
        raise InvalidArgumentError(f"token name {ANONYMOUS!r} is reserved for the audit log")
    return name


def validate_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidArgumentError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    return scope


def create_token(
    session: Session, *, name: str, scope: str, expires_in: timedelta | None = None, created_by: str = ""
) -> tuple[OperatorToken, str]:
    """A new token row (flushed, not committed) and the plaintext token, shown once."""
    validate_name(name)
    validate_scope(scope)
    if expires_in is not None and not timedelta(0) < expires_in <= MAX_EXPIRES_IN:
        raise InvalidArgumentError(f"expiry must be in (0, {MAX_EXPIRES_IN.days} days]")
    token_id = secrets.token_hex(6)
    plaintext = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    now = utcnow()
    row = OperatorToken(
        id=token_id, name=name, scope=scope, secret_hash=hash_token(plaintext), created_by=created_by,
        created_at=now, expires_at=now + expires_in if expires_in is not None else None,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def list_tokens(session: Session, *, offset: int = 0, limit: int = 100) -> tuple[list[OperatorToken], int]:
    """Every token (revoked and expired included), oldest first."""
    count = session.scalar(select(func.count()).select_from(OperatorToken)) or 0
    rows = session.scalars(select(OperatorToken).order_by(OperatorToken.created_at, OperatorToken.id)
                           .offset(offset).limit(limit))
    return list(rows), count


def get_token(session: Session, token_id: str) -> OperatorToken:
    row = session.get(OperatorToken, token_id)
    if row is None:
        raise NotFoundError(f"operator token {token_id} not found")
    return row


def revoke_token(session: Session, token_id: str) -> OperatorToken:
    """Refuse the token from now on (idempotent: a revoked token keeps its first revocation time)."""
    row = get_token(session, token_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def authenticate(session: Session, presented: str | None) -> OperatorToken:
    """The active token whose hash matches ``presented``; 401 (UnauthenticatedError) otherwise."""
    if not presented:
        raise UnauthenticatedError(MISSING)
    if len(presented) > MAX_PRESENTED:
        raise UnauthenticatedError(INVALID)
    digest = hash_token(presented)
    row = session.scalars(select(OperatorToken).where(OperatorToken.secret_hash == digest)).first()
    # The lookup is by hash; compare again in constant time so correctness never rests on the
    # database's string comparison.
    if row is None or not hmac.compare_digest(row.secret_hash, digest):
        raise UnauthenticatedError(INVALID)
    return row


def check_active(row: OperatorToken, now: datetime | None = None) -> None:
    now = now or utcnow()
    if row.revoked_at is not None:
        raise UnauthenticatedError(REVOKED.format(id=row.id, at=_aware(row.revoked_at).isoformat()))  # type: ignore[union-attr]
    expires = _aware(row.expires_at)
    if expires is not None and expires <= now:
        raise UnauthenticatedError(EXPIRED.format(id=row.id, at=expires.isoformat()))


def mark_used(session: Session, row: OperatorToken, now: datetime | None = None) -> bool:
    """Sets ``last_used_at`` unless it was set within the last minute (one write per minute
    per token, not one per request). True if the row changed."""
    now = now or utcnow()
    last = _aware(row.last_used_at)
    if last is not None and now - last < LAST_USED_EVERY:
        return False
    row.last_used_at = now
    return True


# --- first start ------------------------------------------------------------------------------


def bootstrap_token_path(data_dir: Path) -> Path:
    """Where the server writes the admin token it creates on first start (mode 0600)."""
    return Path(data_dir) / BOOTSTRAP_FILE


def read_bootstrap_token(data_dir: Path) -> str:
    """The bootstrap admin token of a server's data dir (for the local fleet runner and tests)."""
    return bootstrap_token_path(data_dir).read_text().strip()


def write_secret_file(path: Path, text: str) -> None:
    """Writes ``text`` to ``path``, mode 0600 from creation, durably
    (:func:`server.store.durable.write_private_file`)."""
    write_private_file(path, text.encode())


def _provision(session: Session, token: str) -> None:
    """Keeps the row of EDGELOOP_OPERATOR_TOKEN (an admin token chosen by the deployment)
    in step with the setting: a changed value replaces the old hash (the old value stops
    working); a revoked value stays revoked until the setting changes."""
    if len(token) < 32:  # no REST rate limit: a short value could be guessed
        log.warning("EDGELOOP_OPERATOR_TOKEN is only %d characters: use a long random value "
                    "(openssl rand -hex 32)", len(token))
    digest = hash_token(token)
    row = session.get(OperatorToken, PROVISIONED_ID)
    if row is None:
        session.add(OperatorToken(id=PROVISIONED_ID, name=PROVISIONED_NAME, scope="admin", secret_hash=digest,
                                  created_by="EDGELOOP_OPERATOR_TOKEN"))
    elif not hmac.compare_digest(row.secret_hash, digest):
        row.secret_hash, row.created_at, row.revoked_at, row.last_used_at = digest, utcnow(), None, None
    elif row.revoked_at is not None:
        log.warning("EDGELOOP_OPERATOR_TOKEN is set but was revoked; it is refused until the setting changes")
    session.flush()


def ensure_operator_access(factory: sessionmaker[Session], data_dir: Path, provisioned: str = "") -> str | None:
    """Run at server start. Stores ``provisioned`` (EDGELOOP_OPERATOR_TOKEN) if set; then, if
    no active admin token exists, creates ``bootstrap-admin``, writes it to
    :func:`bootstrap_token_path` and returns it (else None).

    Replicas starting together on one PostgreSQL database serialise on an advisory lock, so
    exactly one provisions; elsewhere a lost insert race (IntegrityError) is re-checked."""
    for attempt in range(3):
        try:
            return _ensure_operator_access_once(factory, data_dir, provisioned)
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("another server provisioned operator access at the same moment; checking again")
    return None


def _ensure_operator_access_once(factory: sessionmaker[Session], data_dir: Path, provisioned: str) -> str | None:
    with transaction(factory) as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext('edgeloop-operator-access'))"))
        if provisioned:
            _provision(s, provisioned)
        admins = s.scalars(select(OperatorToken).where(OperatorToken.scope == "admin",
                                                       OperatorToken.revoked_at.is_(None)))
        if any(is_active(t) for t in admins):
            return None
        row, plaintext = create_token(s, name=BOOTSTRAP_NAME, scope="admin", created_by="first start")
        path = bootstrap_token_path(data_dir)
        # Written before the commit: a token nobody can read would lock the operator out.
        write_secret_file(path, plaintext + "\n")
    log.warning("no active admin token: created operator token %r (id %s, scope admin): %s  "
                "(shown once; also in %s, mode 0600)", BOOTSTRAP_NAME, row.id, plaintext, path)
    return plaintext
