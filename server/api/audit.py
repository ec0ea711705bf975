"""Audits every mutating operator call (POST, PUT, PATCH, DELETE under /api/v1), refused ones
included: who (token id and name, or "anonymous"), what (the route's operation id and its
path parameters), when, and the outcome (status code, and the error detail if any).

Ordering, so that no change goes unrecorded:
1. before the call runs, a row is committed in its own transaction (status null); if that
   write fails the call is refused with 503 and nothing runs;
2. the call runs (its own session and commit) and its response is held back;
3. the row is completed with the outcome, then the response is sent. If this second write
   fails, the response still goes out (the change is made) and the row keeps status null:
   "outcome unknown", never "no record"; the failure is logged at ERROR.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import Caller
from server.api.errors import error_response
from server.domain import audit

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDIT_UNAVAILABLE = "the audit log cannot be written (database unreachable?); nothing was changed"
UNMATCHED = "unmatched"  # the request reached no route: unknown path, wrong method, body too large


def _route_of(scope: Scope, action_of: Callable[[APIRoute], str]) -> tuple[str, dict[str, Any]]:
    """The operation id and path parameters of the route that served this request (the
    router records both in the scope once it has matched one)."""
    route = scope.get("route")
    if isinstance(route, APIRoute):
        return action_of(route), dict(scope.get("path_params", {}))
    return UNMATCHED, {}


def _target(path_params: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> str:
    parts = [f"{k}={v}" for k, v in sorted(path_params.items())]
    location = dict(headers).get(b"location")
    if location:  # a create: name what it made
        parts.append(f"created={location.decode('latin-1').rsplit('/', 1)[-1]}")
    return ",".join(parts)


def _detail(status: int, body: bytes) -> str:
    if status < 400:
        return ""
    try:
        return str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        return ""


class AuditMiddleware:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, prefix: str, action_of: Callable[[APIRoute], str]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.prefix = prefix
        self.action_of = action_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        factory = self.fastapi_app.state.ctx.factory
        caller = Caller()
        scope.setdefault("state", {})["caller"] = caller
        try:
            event_id = await run_in_threadpool(audit.begin, factory, scope["method"], scope["path"])
        except Exception:  # noqa: BLE001 - any failure: refuse rather than act unrecorded
            log.exception("audit log write failed; refusing %s %s", scope["method"], scope["path"])
            await error_response(503, AUDIT_UNAVAILABLE)(scope, receive, send)
            return

        held: list[Message] = []
        start: dict[str, Any] = {}

        async def hold(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            held.append(message)

        try:
            await self.app(scope, receive, hold)
        except BaseException:
            await self._finish(event_id, scope, caller, 500, [], b"")
            raise
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        await self._finish(event_id, scope, caller, start.get("status", 500), start.get("headers", []), body)
        for message in held:
            await send(message)

    async def _finish(self, event_id: int, scope: Scope, caller: Caller, status: int,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        action, params = _route_of(scope, self.action_of)
        outcome = audit.Outcome(token_id=caller.token_id, token_name=caller.token_name, action=action,
                                target=_target(params, headers), status=status, detail=_detail(status, body))
        try:
            await run_in_threadpool(audit.finish, self.fastapi_app.state.ctx.factory, event_id, outcome)
        except Exception:  # noqa: BLE001 - the change is made; the row stays "outcome unknown"
            log.error("audit event %d: could not record the outcome %s of %s %s by %s",
                      event_id, status, scope["method"], scope["path"], caller.token_name, exc_info=True)
