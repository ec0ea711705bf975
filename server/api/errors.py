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

from server.api.schemas import ErrorPublic
from server.domain.errors import (
    ConflictError,
    DomainError,
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
}
INTERNAL_ERROR = "internal server error"
# What each error status means, for the OpenAPI description of the routes that can return it.
ERROR_TEXT: dict[int, str] = {
    401: "Missing or wrong operator token.",
    404: "The named object does not exist.",
    409: "The request conflicts with the object's current state.",
    413: "The request body is too large.",
    422: "The request is malformed or a value is out of bounds.",
    503: "The database is unreachable.",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each error code with the ``{"detail"}`` body."""
    return {code: {"description": ERROR_TEXT[code], "model": ErrorPublic} for code in codes}


def status_of(exc: DomainError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)


def format_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's error list as ``"body.cohort.tag: String should match pattern ...; ..."``."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never leak internals (paths, SQL) to the caller; the log has the traceback.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL_ERROR)
