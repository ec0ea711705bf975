"""Operator API tokens: create (the secret is shown once), list, revoke. Admin only."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from server.api.deps import ScopeCheck, SessionDep, require_scope
from server.api.errors import responses
from server.api.pagination import DEFAULT_LIMIT, LimitParam, TokenOffset
from server.api.schemas import TokenCreate, TokenCreated, TokenPublic, TokensPublic
from server.db.models import OperatorToken
from server.domain import operators as ops

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=responses(401, 403, 422))

TokenId = Annotated[str, Path(max_length=32, description="Token id (from GET /api/v1/tokens).")]
ADMIN = ScopeCheck("admin")


def token_public(row: OperatorToken) -> TokenPublic:
    return TokenPublic(id=row.id, name=row.name, scope=row.scope, created_by=row.created_by,  # type: ignore[arg-type]
                       created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
                       last_used_at=row.last_used_at, active=ops.is_active(row))


@router.post("", status_code=201, response_model=TokenCreated, responses=responses(413))
def create_token(
    body: TokenCreate, response: Response, session: SessionDep,
    caller: Annotated[OperatorToken, Depends(ADMIN)],
) -> TokenCreated:
    """Create a token. The response carries the secret ``token``; it is never shown again."""
    expires = timedelta(seconds=body.expires_in_s) if body.expires_in_s is not None else None
    row, plaintext = ops.create_token(session, name=body.name, scope=body.scope, expires_in=expires,
                                      created_by=caller.name)
    session.commit()
    response.headers["Location"] = f"/api/v1/tokens/{row.id}"
    return TokenCreated(**token_public(row).model_dump(), token=plaintext)


@router.get("", response_model=TokensPublic, dependencies=[require_scope("admin")])
def list_tokens(session: SessionDep, offset: TokenOffset = 0, limit: LimitParam = DEFAULT_LIMIT) -> TokensPublic:
    """Every token, revoked and expired ones included (without secrets), oldest first."""
    rows, count = ops.list_tokens(session, offset=offset, limit=limit)
    return TokensPublic(data=[token_public(r) for r in rows], count=count)


@router.delete("/{token_id}", response_model=TokenPublic, responses=responses(404),
               dependencies=[require_scope("admin")])
def revoke_token(token_id: TokenId, session: SessionDep) -> TokenPublic:
    """Revoke a token: it is refused from the next call on (idempotent; the row is kept for
    the audit log). Revoking the token making the call is allowed."""
    row = ops.revoke_token(session, token_id)
    session.commit()
    return token_public(row)
