"""The operators' REST API: ``create_app(ctx)`` builds the FastAPI app over a running server's
context. Agents use gRPC; this API is for people and scripts (devices, labels, rounds, models).

Routes live under /api/v1; each declares the token scope it needs (server/api/deps.py), and
the app refuses to build if one does not. /healthz is open for probes; /metrics needs a read
token unless ``metrics_public``. Mutating calls are audited (server/api/audit.py). OpenAPI:
/docs and /openapi.json.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.audit import AuditMiddleware
from server.api.deps import route_scopes
from server.api.errors import ERROR_TEXT, error_response, install_error_handlers
from server.api.routes import (
    audit,
    console,
    devices,
    enrollment,
    events,
    health,
    models,
    rounds,
    samples,
    signing,
    tokens,
)
from server.console.serve import install_console
from server.context import ServerContext
from server.domain.operators import ensure_operator_access
from server.domain.samples import label_classes
from server.grpc_api.ratelimit import RateLimiter

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
UNAVAILABLE_TEXT = ("The database is unreachable: the token cannot be checked, or (a mutating call) its audit "
                    "record cannot be written. Nothing was changed.")
# Bodies are small JSON documents. 2 MiB (not 1) because the largest legal one, 10 000 labels
# each naming sample and device, is about 1.4 MB.
MAX_BODY_BYTES = 2 << 20
TOO_LARGE = "request body exceeds {limit} bytes"
TOO_MANY_FAILURES = ("too many calls without a valid operator token from {source}; retry in {wait} s "
                     "(refused before the token, the database or the audit log are touched)")
GLOBAL_FAILURE_FACTOR = 10  # the all-sources budget of 401s: 10 times one source's
_ALL_SOURCES = "*"


def rest_source(scope: Scope) -> str:
    """The rate-limit key of an HTTP client: its address (IPv6 by /64). Behind a proxy every
    caller is the proxy's address: forwarded headers are not trusted (docs/security.md)."""
    host = (scope.get("client") or ("unknown", 0))[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class AuthFailureLimitMiddleware:
    """Outermost: limits calls answered ``401`` (no, malformed, unknown, expired or revoked
    token), per source address and for all sources together, counting failures only (like
    gRPC's Register: every call takes a token, any answer but 401 gives it back, so guesses
    in flight cannot all slip in). Over either budget the call gets ``429`` with
    ``Retry-After`` at once, before the token is looked up and before the audit middleware
    writes a row: refused anonymous calls reach the audit log (and the database) at most at
    the global rate (docs/security.md#audit-log)."""

    def __init__(self, app: ASGIApp, rate_per_s: float, burst: int, max_keys: int) -> None:
        self.app = app
        self.per_source = RateLimiter(rate_per_s, burst, max_keys=max_keys)
        self.overall = RateLimiter(rate_per_s * GLOBAL_FAILURE_FACTOR, burst * GLOBAL_FAILURE_FACTOR, max_keys=1)
        self.refused = 0  # calls answered 429 since the last summary log line
        self._last_log = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.per_source.enabled or scope["path"] in OPEN_PATHS
                or not (scope["path"].startswith(API_PREFIX + "/") or scope["path"] == "/metrics")):
            await self.app(scope, receive, send)
            return
        source = rest_source(scope)
        wait = self.per_source.try_acquire(source)
        if wait == 0:
            wait = self.overall.try_acquire(_ALL_SOURCES)
            if wait > 0:
                self.per_source.refund(source)
        if wait > 0:
            await self._refuse(scope, receive, send, source, wait)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if status != 401:  # only failed authentications count
                self.per_source.refund(source)
                self.overall.refund(_ALL_SOURCES)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, source: str, wait: float) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= 60:  # one summary a minute, not a line per refusal
            log.warning("REST: refused %d calls over the failed-authentication limit in the last minute "
                        "(latest from %s)", self.refused, source)
            self.refused, self._last_log = 0, now
        seconds = max(1, math.ceil(wait))
        await error_response(429, TOO_MANY_FAILURES.format(source=source, wait=seconds),
                             {"Retry-After": str(seconds)})(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 before the app sees a body over ``max_bytes``: a declared Content-Length is
    checked up front, a chunked body is counted as it arrives (and buffered, at most
    ``max_bytes``, then replayed to the app)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        buffered: list[Message] = []
        total = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # disconnect: let the app see it
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, TOO_LARGE.format(limit=self.max_bytes))(scope, receive, send)


def operation_id(route: APIRoute) -> str:
    """OpenAPI ids ``{tag}-{name}`` (e.g. ``rounds-create_round``) keep generated clients stable."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def add_runtime_bounds(app: FastAPI, ctx: ServerContext) -> None:
    """Writes what comes from this server's settings into its OpenAPI document (the pydantic
    models cannot know it): a label is at most ``label_classes(arch) - 1``; /metrics is open if
    ``metrics_public``. Also documents every route's token errors (:func:`document_auth`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = generate()  # FastAPI caches it in app.openapi_schema
        if first:
            if ctx.settings.metrics_public:
                schema["paths"]["/metrics"]["get"].pop("security", None)
            document_auth(schema)
            classes = label_classes(ctx.settings.arch)  # a p-Meta fleet takes any class id
            label = schema["components"]["schemas"]["LabelIn"]["properties"]["label"]
            label["maximum"] = classes - 1
            label["description"] = f"Class label, in [0, {classes})."
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(ctx: ServerContext, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(
        title="EdgeLoop operator API",
        version="1",
        description=(
            "Manage an EdgeLoop fleet: devices, samples and labels, update rounds, model versions. "
            "Every /api/v1 route (and /metrics unless public) needs 'Authorization: Bearer <operator "
            "token>' with a scope: read (GET routes) < operate (rounds, labels) < admin (devices, "
            "tokens, audit). Every error body is {\"detail\": \"...\"}."
        ),
        generate_unique_id_function=operation_id,
    )
    app.state.ctx = ctx
    app.state.metrics_registry = health.metrics_registry(ctx)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    # Outermost, so refused calls (413s included) are audited too.
    app.add_middleware(AuditMiddleware, fastapi_app=app, prefix=API_PREFIX, action_of=operation_id)
    # Outside the audit log: a guesser over its budget costs neither a row nor a lookup.
    s = ctx.settings
    app.add_middleware(AuthFailureLimitMiddleware, rate_per_s=s.rest_auth_fail_rate_per_s,
                       burst=s.rest_auth_fail_burst, max_keys=s.rate_limit_max_keys)

    api = APIRouter(prefix=API_PREFIX)
    for module in (devices, samples, models, rounds, tokens, audit, enrollment, signing, console, events):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)
    install_console(app, ctx)  # /ui: the web console (docs/console.md)
    check_route_scopes(app)
    add_runtime_bounds(app, ctx)
    ensure_operator_access(ctx.factory, ctx.settings.data_dir, ctx.settings.operator_token)
    return app


OPEN_PATHS = frozenset({"/healthz"})


def api_routes(app: FastAPI) -> list[Any]:
    """Every FastAPI route of the app with its full path and effective dependencies (FastAPI
    keeps included routers nested; ``iter_route_contexts`` flattens them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before nested routers: app.routes is flat
        return [r for r in app.routes if isinstance(r, APIRoute)]
    return [rc for rc in iter_route_contexts(app.routes) if isinstance(rc.original_route, APIRoute)]


def check_route_scopes(app: FastAPI) -> None:
    """Every route but /healthz declares exactly one token scope: a new route without one
    fails here, at start-up, instead of being served open."""
    for route in api_routes(app):
        scopes = route_scopes(route)
        if route.path in OPEN_PATHS:
            if scopes:
                raise RuntimeError(f"route {route.path} is meant to be open but requires {scopes}")
        elif len(scopes) != 1:
            raise RuntimeError(f"route {sorted(route.methods)} {route.path} must declare exactly one scope "
                               f"with dependencies=[require_scope(...)], has {scopes}")


def document_auth(schema: dict[str, Any]) -> None:
    """Adds to the OpenAPI document the 401/403/503 answers of every operation that needs a token."""
    error = {"$ref": "#/components/schemas/ErrorPublic"}
    for item in schema["paths"].values():
        for op in item.values():
            if not op.get("security"):
                continue
            for code in (401, 403, 503):
                op["responses"].setdefault(str(code), {
                    "description": ERROR_TEXT[code] if code != 503 else UNAVAILABLE_TEXT,
                    "content": {"application/json": {"schema": error}},
                })
