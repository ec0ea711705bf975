"""One server process: gRPC for agents, REST for operators, and (unless turned off) a round
worker, sharing a database and a blob store; or a worker process that runs rounds only."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import uvicorn

from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.api.main import create_app
from server.context import ServerContext
from server.grpc_api.servicer import FleetServicer
from server.settings import DEV_ENROLLMENT_TOKEN, ServerSettings
from server.worker import RoundWorker

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _round_worker(ctx: ServerContext) -> RoundWorker:
    return RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                       targets_changed=ctx.targets_changed)


def _serve_until_signalled(stop: Callable[[], None]) -> None:
    """Block until SIGINT or SIGTERM, then ``stop()`` (an orderly shutdown, not a kill)."""
    requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: requested.set())
    requested.wait()
    stop()


class EdgeLoopServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.ctx = ServerContext.open(settings, run_migrations=settings.migrate_on_start)
        self.worker = _round_worker(self.ctx) if settings.embedded_worker else None
        self.grpc_port = 0
        self.rest_port = 0
        self._grpc: grpc.Server | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._rest_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        s = self.settings
        if s.enrollment_token == DEV_ENROLLMENT_TOKEN and s.grpc_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the gRPC API listens on %s with the default enrollment token: set EDGELOOP_ENROLLMENT_TOKEN", s.grpc_host)
        opts = [
            ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
            ("grpc.max_send_message_length", s.grpc_max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=s.grpc_max_workers, thread_name_prefix="grpc"),
                                 options=opts, maximum_concurrent_rpcs=s.grpc_max_workers)
        pb_grpc.add_EdgeFleetServicer_to_server(
            FleetServicer(s, self.ctx.factory, self.ctx.blobs, self.ctx.targets_changed), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise RuntimeError(f"cannot bind gRPC to {s.grpc_host}:{s.grpc_port}")
        self._grpc.start()
        sock = _bind(s.rest_host, s.rest_port)
        self.rest_port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.ctx), log_level=s.log_level.lower(), access_log=False, lifespan="on")
        self._uvicorn = uvicorn.Server(config)
        self._rest_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="rest", daemon=True)
        self._rest_thread.start()
        if self.worker is not None:
            self.worker.start()
        log.info("EdgeLoop server: REST http://%s:%d/api/v1 (docs /docs), gRPC %s:%d",
                 s.rest_host, self.rest_port, s.grpc_host, self.grpc_port)

    def write_ready_file(self, path: Path) -> None:
        """Tell a supervising process (fleet runner, tests) the ports actually bound."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "rest_port": self.rest_port, "grpc_port": self.grpc_port}))
        os.replace(tmp, path)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping server")
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1)
        if self.worker is not None:
            self.worker.stop()
        if self._rest_thread is not None:
            self._rest_thread.join(grace)
        self.ctx.close()

    def serve_forever(self) -> None:
        _serve_until_signalled(self.stop)


class WorkerProcess:
    """``edgeloop server worker``: rounds only (no REST, no gRPC), on the server's database
    and blob directory. Run as many as there are cores to spare; rounds of different
    lineages run side by side, rounds of one lineage in order."""

    def __init__(self, settings: ServerSettings) -> None:
        self.ctx = ServerContext.open(settings, run_migrations=settings.migrate_on_start)
        self.worker = _round_worker(self.ctx)

    def start(self) -> None:
        self.worker.start()
        log.info("EdgeLoop round worker %s started", self.worker.worker_id)

    def stop(self) -> None:
        # Finish the round in hand within compose's 60 s grace, else fail it (a killed worker is
        # reaped by the others).
        self.worker.stop(timeout=45.0)
        self.ctx.close()

    def serve_forever(self) -> None:
        _serve_until_signalled(self.stop)
