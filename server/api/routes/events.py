"""Server-sent events for the console: round status and progress pushed as they change.

``GET /api/v1/events`` (``read`` scope) answers ``text/event-stream``. Browsers read it with
``fetch()`` (``EventSource`` cannot send the Authorization header). Events (docs/console.md):
``rounds`` (the newest rounds, as ``GET /api/v1/rounds`` lists them) and, with ``round_id``,
``round`` (that round's full report, as ``GET /api/v1/rounds/{id}``); each is sent when its
JSON changes. The stream wakes on the server's notifiers (a round queued, targets moved, a device
revoked) and otherwise reads the database every second, which also catches the progress the
worker (possibly another process) writes. A comment line every 15 s keeps proxies from
closing an idle stream. Not in the OpenAPI document: the stream never ends by itself, so a
generated client or fuzzer cannot exercise it like the other operations.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import CtxDep, require_scope
from server.api.errors import responses
from server.api.routes.console import newest_rounds
from server.api.routes.rounds import summary
from server.api.schemas import RoundPublic
from server.context import ServerContext
from server.domain import rounds as R

router = APIRouter(tags=["events"], responses=responses(401, 404, 422))

POLL_S = 1.0  # database read between wake-ups: progress lines are not notified
KEEPALIVE_S = 15.0
ROUNDS_IN_STREAM = 20


def snapshot(ctx: ServerContext, round_id: str | None) -> dict[str, Any]:
    """What the stream shows now: event name -> JSON-able payload."""
    with ctx.factory() as s:
        rounds = [summary(r).model_dump(mode="json") for r in newest_rounds(s, ROUNDS_IN_STREAM)]
        out: dict[str, Any] = {"rounds": {"data": rounds, "count": len(rounds)}}
        if round_id is not None:
            out["round"] = RoundPublic.model_validate(R.round_report(s, R.get_round(s, round_id))).model_dump(mode="json")
        return out


def frame(seq: int, event: str, data: str) -> str:
    """One SSE message; ``data`` is one line of JSON (json.dumps never writes a newline)."""
    return f"id: {seq}\nevent: {event}\ndata: {data}\n\n"


@router.get("/events", include_in_schema=False, dependencies=[require_scope("read")])
async def events(
    request: Request, ctx: CtxDep,
    round_id: Annotated[str | None, Query(max_length=64, description="Also follow this round in full.")] = None,
) -> StreamingResponse:
    """A text/event-stream of round changes (see the module docstring)."""
    first = await run_in_threadpool(snapshot, ctx, round_id)  # an unknown round is a 404 now, not mid-stream
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def poke(_payload: object) -> None:  # runs in the notifying thread
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has closed: the stream is gone
            pass

    unsubscribe = [n.subscribe(poke) for n in (ctx.rounds_wakeup, ctx.targets_changed, ctx.devices_changed)]

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n"
            sent: dict[str, str] = {}
            seq, last_write, snap = 0, time.monotonic(), first
            while not await request.is_disconnected():
                for event, payload in snap.items():
                    data = json.dumps(payload, separators=(",", ":"), sort_keys=True)
                    if sent.get(event) != data:
                        seq += 1
                        sent[event] = data
                        last_write = time.monotonic()
                        yield frame(seq, event, data)
                if time.monotonic() - last_write >= KEEPALIVE_S:
                    last_write = time.monotonic()
                    yield ": keepalive\n\n"
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass
                snap = await run_in_threadpool(snapshot, ctx, round_id)
        finally:
            for u in unsubscribe:
                u()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
