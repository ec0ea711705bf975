"""Named dependency types for the REST routes: the server context, a database session, and
the operator check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.context import ServerContext
from server.domain.errors import UnauthenticatedError

MISSING_TOKEN = "missing operator token (header 'Authorization: Bearer <token>')"
WRONG_TOKEN = "invalid operator token"

_bearer = HTTPBearer(auto_error=False, description="The server's operator token (EDGELOOP_OPERATOR_TOKEN).")


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    """One session per request. Handlers that write call ``commit()`` themselves, before they
    answer, so a 2xx means the change is durable; anything raised rolls everything back."""
    with ctx.factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_operator(
    ctx: CtxDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Every /api/v1 route needs the operator token when the server has one configured."""
    expected = ctx.settings.operator_token
    if not expected:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise UnauthenticatedError(MISSING_TOKEN)
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise UnauthenticatedError(WRONG_TOKEN)


OperatorDep = Depends(require_operator)

# Operator token scopes (issue 9): ``read`` (GET endpoints), ``operate`` (rounds, labels),
# ``admin`` (devices, enrollment, tokens, audit). A route declares the scope it needs with
# ``dependencies=[require_scope("operate")]``. PLACEHOLDER by the lead: the scoped token
# check is being written; until then this is the old single-token check.
SCOPES = ("read", "operate", "admin")


def require_scope(scope: str):
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {SCOPES}")
    return Depends(require_operator)
