"""The operators' REST API: ``create_app(ctx)`` builds the FastAPI app over a running server's
context. Agents use gRPC; this API is for people and scripts (devices, labels, rounds, models).

Routes live under /api/v1 (operator token required when configured); /healthz and /metrics
are open for probes and scrapers. OpenAPI: /docs and /openapi.json.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import OperatorDep
from server.api.errors import error_response, install_error_handlers
from server.api.routes import devices, health, models, rounds, samples
from server.context import ServerContext

API_PREFIX = "/api/v1"
# Bodies are small JSON documents. 2 MiB (not 1) because the largest legal one, 10 000 labels
# each naming sample and device, is about 1.4 MB.
MAX_BODY_BYTES = 2 << 20
TOO_LARGE = "request body exceeds {limit} bytes"


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
    """Writes the bounds that come from this server's settings into its OpenAPI document (the
    pydantic models cannot know them): a label is at most ``num_classes - 1``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = generate()  # FastAPI caches it in app.openapi_schema
        if first:
            label = schema["components"]["schemas"]["LabelIn"]["properties"]["label"]
            label["maximum"] = ctx.settings.arch.num_classes - 1
            label["description"] = f"Class label, in [0, {ctx.settings.arch.num_classes})."
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(ctx: ServerContext, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(
        title="EdgeLoop operator API",
        version="1",
        description=(
            "Manage an EdgeLoop fleet: devices, samples and labels, update rounds, model versions. "
            "Send 'Authorization: Bearer <operator token>' on /api/v1 routes when the server has "
            "one configured. Every error body is {\"detail\": \"...\"}."
        ),
        generate_unique_id_function=operation_id,
    )
    app.state.ctx = ctx
    app.state.metrics_registry = health.metrics_registry(ctx)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    api = APIRouter(prefix=API_PREFIX, dependencies=[OperatorDep])
    for module in (devices, samples, models, rounds):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)
    add_runtime_bounds(app, ctx)
    return app
