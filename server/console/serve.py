"""Mounts the console's static files at ``/ui`` with a strict Content-Security-Policy, and
runs the accuracy-history sampler for the app's lifetime.

The assets are public (no data in them); every figure the pages show comes from /api/v1 with
the operator token the user pasted, so a ``read`` token sees everything and changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.console.history import MetricsHistory
from server.context import ServerContext

STATIC_DIR = Path(__file__).parent / "static"
UI_PREFIX = "/ui"
# Self only: no inline script or style, no other origin, no framing. Sample images are fetched
# with the token and shown as blob: URLs (an <img src> cannot send Authorization).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),  # revalidate: a server upgrade brings new assets at once
]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {h for h, _ in SECURITY_HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0] not in names] + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def _redirect(_request: object) -> RedirectResponse:
    return RedirectResponse(UI_PREFIX + "/", status_code=308)


def install_console(app: FastAPI, ctx: ServerContext) -> None:
    """``/ui/`` serves index.html and its assets; the history sampler runs while the app does."""
    app.router.routes.append(Route(UI_PREFIX, _redirect, methods=["GET", "HEAD"], include_in_schema=False))
    app.router.routes.append(Mount(UI_PREFIX, app=SecurityHeaders(StaticFiles(directory=STATIC_DIR, html=True)),
                                   name="console"))
    history = MetricsHistory(ctx)
    app.state.console_history = history
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: object) -> AsyncIterator[object]:
        history.start()
        try:
            async with inner(a) as state:
                yield state
        finally:
            history.stop()

    app.router.lifespan_context = lifespan  # type: ignore[assignment]
