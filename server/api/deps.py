"""Named dependency types for the REST routes: the server context, a database session, and
the operator token check every route declares (``dependencies=[require_scope("read")]``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from server.context import ServerContext
from server.db.models import OperatorToken
from server.domain import operators as ops
from server.domain.errors import ForbiddenError
from server.settings import ServerSettings

# Operator token scopes (issue 9), hierarchical: ``read`` (GET endpoints) < ``operate``
# (rounds, labels) < ``admin`` (devices, enrollment, tokens, audit).
SCOPES = ops.SCOPES
INSUFFICIENT = "operator token {id} ({name!r}) has scope {have!r}; this call needs {need!r}"
DATABASE_UNREACHABLE = "database unreachable"

_bearer = HTTPBearer(
    auto_error=False, scheme_name="OperatorToken",
    description="An operator API token (`elop_<id>_<secret>`, from `edgeloop server token create`, "
                "`POST /api/v1/tokens` or the first-start file `<data_dir>/operator-token`).",
)


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    """One session per request. Handlers that write call ``commit()`` themselves, before they
    answer, so a 2xx means the change is durable; anything raised rolls everything back."""
    with ctx.factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass
class Caller:
    """Who made a request, filled in by the scope check; the audit middleware reads it."""

    token_id: str | None = None
    token_name: str = ops.ANONYMOUS


def caller_of(request: Request) -> Caller:
    """The request's Caller (the audit middleware puts one in ``scope["state"]`` first, so
    both see the same object)."""
    state = request.scope.setdefault("state", {})
    caller = state.get("caller")
    if caller is None:
        caller = state["caller"] = Caller()
    return caller


class ScopeCheck:
    """The dependency behind :func:`require_scope`: a valid, active token whose scope covers
    ``scope`` (401 without one, 403 when its scope is too low). ``open_if(settings)`` true
    lets the route be called without a token (``/metrics`` with ``metrics_public``)."""

    def __init__(self, scope: str, open_if: Callable[[ServerSettings], bool] | None = None) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; one of {SCOPES}")
        self.scope = scope
        self.open_if = open_if

    def __call__(
        self, request: Request, ctx: CtxDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> OperatorToken | None:
        if self.open_if is not None and self.open_if(ctx.settings):
            return None
        caller = caller_of(request)
        try:
            with ctx.factory() as s:
                token = ops.authenticate(s, credentials.credentials if credentials else None)
                caller.token_id, caller.token_name = token.id, token.name
                ops.check_active(token)
                if not ops.scope_allows(token.scope, self.scope):
                    raise ForbiddenError(INSUFFICIENT.format(id=token.id, name=token.name, have=token.scope,
                                                             need=self.scope))
                if ops.mark_used(s, token):
                    s.commit()
                return token
        except (OperationalError, InterfaceError):
            # No database, no way to check the token: a 503 like /healthz's, not a 500.
            raise HTTPException(503, DATABASE_UNREACHABLE) from None


def require_scope(scope: str, *, open_if: Callable[[ServerSettings], bool] | None = None):
    """``dependencies=[require_scope("operate")]``: the route needs a token of at least that
    scope. Every /api/v1 route declares exactly one (create_app checks)."""
    return Depends(ScopeCheck(scope, open_if))


def route_scopes(route: APIRoute) -> list[str]:
    """The scopes a route's dependencies require (exactly one for a correctly declared route)."""
    found: list[str] = []
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, ScopeCheck):
            found.append(dep.call.scope)
        stack.extend(dep.dependencies)
    return found
