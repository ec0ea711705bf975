"""Every REST error is ``{"detail": "<one fixed, human-readable sentence>"}``.

Domain errors map to status codes here (the gRPC servicer has its own table); request
validation errors are flattened from pydantic's list into one string so clients can show
``detail`` as is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from server.api.schemas import ErrorPublic
from server.domain.errors import (
    ConflictError,
    DomainError,
    ForbiddenError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

STATUS: dict[type[DomainError], int] = {
    NotFoundError: 404,
    InvalidArgumentError: 422,
    ConflictError: 409,
    UnauthenticatedError: 401,
    ForbiddenError: 403,
}
INTERNAL_ERROR = "internal server error"
UNREADABLE_BODY = "body: not a UTF-8 JSON document"
METHOD_NOT_ALLOWED = "method not allowed here; allowed: {allow}"
PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# What each error status means, for the OpenAPI description of the routes that can return it.
ERROR_TEXT: dict[int, str] = {
    401: "Missing, malformed, unknown, expired or revoked operator token.",
    403: "The operator token's scope does not cover this call.",
    404: "The named object does not exist.",
    409: "The request conflicts with the object's current state.",
    413: "The request body is too large.",
    422: "The request is malformed or a value is out of bounds.",
    503: "The database is unreachable.",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each error code with the ``{"detail"}`` body."""
    return {code: {"description": ERROR_TEXT[code], "model": ErrorPublic} for code in codes}


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route serves at this request's path, found by asking the router about
    each. Starlette's own 405 names only the first route whose path matched, so
    ``OPTIONS /api/v1/rounds`` said ``Allow: POST`` without GET."""
    return [
        method for method in PROBED_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]


def status_of(exc: DomainError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)


def _collapse(parts: Iterable[str]) -> list[str]:
    """Drops a part equal to the one before: a tagged union's member tag repeats its field
    (``body.cohort.tag.tag`` reads ``body.cohort.tag``)."""
    out: list[str] = []
    for part in parts:
        if not out or out[-1] != part:
            out.append(part)
    return out


def format_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's error list as ``"body.cohort.tag: String should match pattern ...; ..."``."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            parts.append(f"body: invalid JSON at character {err['loc'][-1]}: {err.get('ctx', {}).get('error', '')}")
            continue
        loc = ".".join(_collapse(str(p) for p in err.get("loc", ())))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, format_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only 400: a body it could not decode (e.g. not UTF-8). A malformed body
            # is a 422 like every other malformed request, as the OpenAPI document says.
            return error_response(422, UNREADABLE_BODY)
        if exc.status_code == 405:
            allow = ", ".join(allowed_methods(request.app, request.scope))
            return error_response(405, METHOD_NOT_ALLOWED.format(allow=allow), {"Allow": allow})
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never leak internals (paths, SQL) to the caller; the log has the traceback.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL_ERROR)
