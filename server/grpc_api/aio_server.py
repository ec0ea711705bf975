"""The agent gRPC server (grpc.aio) on its own event loop in a background thread: what
server/app.py runs and what the tests start on loopback ports.

One loop serves every call; an open stream is a waiting coroutine. Blocking work runs on a
:class:`BlockingPool` sized to the database pool (``grpc_max_workers``, 0: the pool's size),
which sheds agent calls with RESOURCE_EXHAUSTED + ``retry-after-ms`` when more than
``grpc_max_pending`` are waiting. There is no cap on concurrent RPCs that idle streams could
exhaust (per device, ``device_max_streams`` still applies).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.grpc_api.blocking import BlockingPool, pool_threads
from server.grpc_api.servicer import FleetServicer
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)
T = TypeVar("T")
CALL_TIMEOUT_S = 30.0


def grpc_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class AgentGrpcServer:
    """``add_insecure_port``/``add_secure_port`` (return the bound port, 0 on failure), then
    ``start()``; ``stop(grace)`` ends the watch streams, lets calls in flight finish for
    ``grace`` seconds, writes the pending heartbeats and ends the loop. ``servicer`` exists
    from construction (tests may swap its limiters before ``start``)."""

    def __init__(self, ctx: ServerContext, settings: ServerSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = s = settings or ctx.settings
        self.pool = BlockingPool(s.grpc_max_workers or pool_threads(ctx.engine), s.grpc_max_pending)
        self.servicer = FleetServicer(s, ctx.factory, ctx.blobs, targets_changed=ctx.targets_changed,
                                      devices_changed=ctx.devices_changed, pool=self.pool)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="agent-grpc", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server = self._call(self._make())
        self._started = False
        self._stopped = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=grpc_options(self.settings))
        pb_grpc.add_EdgeFleetServicer_to_server(self.servicer, server)
        return server

    async def _add(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                return self._server.add_insecure_port(address)
            return self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc.aio raises where grpc.server returned 0
            log.error("cannot bind gRPC to %s: %s", address, exc)
            return 0

    def add_insecure_port(self, address: str) -> int:
        return self._call(self._add(address, None))

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._call(self._add(address, credentials))

    async def _start(self) -> None:
        self.servicer.start()
        await self._server.start()

    def start(self) -> None:
        self._call(self._start())
        self._started = True

    async def _stop(self, grace: float) -> None:
        await self.servicer.hub.stop()  # idle watch streams end now instead of holding up the grace
        await self._server.stop(grace)
        await self.servicer.stop()  # the last heartbeat flush

    def stop(self, grace: float | None = 0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._started:
                self._call(self._stop(grace or 0), timeout=(grace or 0) + CALL_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
            self.pool.close()

    # --- for tests and benchmarks ---------------------------------------------------------

    def flush_heartbeats(self) -> int:
        """Write the pending heartbeats now; returns how many."""
        return self._call(self.servicer.heartbeats.flush())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server's loop (inspect the hub, the caches) and return its result."""
        return self._call(coro)
