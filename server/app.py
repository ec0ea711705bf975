"""One server process: gRPC for agents, REST for operators, and (unless turned off) a round
worker, sharing a database and a blob store; or a worker process that runs rounds only."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import uvicorn

from server.api.main import create_app
from server.context import ServerContext
from server.db.engine import transaction
from server.domain import enrollment
from server.grpc_api.aio_server import AgentGrpcServer
from server.settings import ServerSettings
from server.tls import ServerTLS, ca_paths, server_tls
from server.worker import RoundWorker
from server.worker_child import ChildWorker

log = logging.getLogger(__name__)
TLS_RECHECK_S = 3600.0  # how often a running server looks whether its certificate needs re-issuing


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


def _embedded_worker(ctx: ServerContext) -> RoundWorker | ChildWorker | None:
    """The server's own round worker: a supervised child process (default: training never
    shares the serving process's GIL), a thread (worker_mode=thread), or none."""
    if not ctx.settings.embedded_worker:
        return None
    return _round_worker(ctx) if ctx.settings.worker_mode == "thread" else ChildWorker(ctx)


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
        self.worker = _embedded_worker(self.ctx)
        self.grpc_port = 0
        self.mtls_port = 0  # bound only with settings.mtls
        self.rest_port = 0
        self._grpc: AgentGrpcServer | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._rest_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.tls: ServerTLS | None = None
        self._tls_lock = threading.Lock()
        self._tls_checked = time.monotonic()

    def _load_tls(self) -> ServerTLS | None:
        s = self.settings
        if s.insecure:
            # Every start says so: plaintext must never become the quiet default of a deployment.
            log.warning("INSECURE: TLS is off (--insecure / EDGELOOP_INSECURE): gRPC and REST serve plaintext; "
                        "credentials, tokens and models cross the network readable and forgeable")
            return None
        tls = server_tls(s)
        if tls.ca_file is not None:
            log.info("TLS: CA %s, sha256 fingerprint %s (agents pin one of them; `edgeloop server tls show`)",
                     tls.ca_file, tls.ca_fingerprint)
        else:
            log.info("TLS: certificate %s for %s", tls.cert_file, ", ".join(tls.hostnames))
        return tls

    def _grpc_credentials(self, tls: ServerTLS) -> grpc.ServerCredentials:
        if tls.ca_file is None:  # the operator's files: served as given, renewed by the operator
            return grpc.ssl_server_credentials([(tls.key_pem, tls.chain_pem)])
        initial = grpc.ssl_server_certificate_configuration([(tls.key_pem, tls.chain_pem)])
        self._served_chain = tls.chain_pem
        return grpc.dynamic_ssl_server_credentials(initial, self._renewed_certificate)

    def _mtls_credentials(self, tls: ServerTLS) -> grpc.ServerCredentials:
        """The mTLS port: the same server certificate, and a client certificate issued by the
        local CA required on every connection (docs/security.md#mutual-tls)."""
        client_ca = ca_paths(self.settings.data_dir)[0].read_bytes()
        self._mtls_chain = tls.chain_pem

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            self._refresh_tls()  # the throttled re-check, shared with the first port
            current = self.tls
            if current is None or current.chain_pem == self._mtls_chain:
                return None
            self._mtls_chain = current.chain_pem
            return grpc.ssl_server_certificate_configuration([(current.key_pem, current.chain_pem)], client_ca)

        initial = grpc.ssl_server_certificate_configuration([(tls.key_pem, tls.chain_pem)], client_ca)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    def _renewed_certificate(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before each handshake (None: keep the current one)."""
        self._refresh_tls()
        current = self.tls
        if current is None or current.chain_pem == self._served_chain:
            return None
        self._served_chain = current.chain_pem
        return grpc.ssl_server_certificate_configuration([(current.key_pem, current.chain_pem)])

    def _refresh_tls(self) -> None:
        """At most every TLS_RECHECK_S, re-run the start-up check, so a long-running server
        re-issues its certificate before expiry; REST takes the new one for its next
        connections too, each gRPC port at its next handshake."""
        with self._tls_lock:
            now = time.monotonic()
            if now - self._tls_checked < TLS_RECHECK_S:
                return
            self._tls_checked = now
            try:
                fresh = server_tls(self.settings)
            except Exception:  # noqa: BLE001 - keep serving the current certificate; say why
                log.exception("TLS: checking the server certificate failed; keeping the current one")
                return
            if self.tls is not None and fresh.chain_pem == self.tls.chain_pem:
                return
            self.tls = fresh
            rest_ssl = self._uvicorn.config.ssl if self._uvicorn is not None else None
            if rest_ssl is not None:  # new REST connections get the new certificate
                rest_ssl.load_cert_chain(str(fresh.cert_file), str(fresh.key_file))
            log.info("TLS: serving the re-issued server certificate (valid until %s)", f"{fresh.not_after:%Y-%m-%d}")

    def start(self) -> None:
        s = self.settings
        with transaction(self.ctx.factory) as session:
            if not enrollment.any_active(session, None):  # no built-in token: say how to make one
                log.warning("no active enrollment token: agents cannot register; %s", enrollment.CREATE_HINT)
        if os.environ.get("EDGELOOP_ENROLLMENT_TOKEN"):  # the old shared secret: ignored, say so
            log.warning("EDGELOOP_ENROLLMENT_TOKEN is no longer used (there is no shared enrollment token); %s",
                        enrollment.CREATE_HINT)
        # The agent server: grpc.aio on its own loop; open streams hold no thread (docs/scale.md).
        self._grpc = AgentGrpcServer(self.ctx, s)
        servicer = self._grpc.servicer
        self.tls = tls = self._load_tls()
        address = f"{s.grpc_host}:{s.grpc_port}"
        if tls is None:
            self.grpc_port = self._grpc.add_insecure_port(address)
        else:
            self.grpc_port = self._grpc.add_secure_port(address, self._grpc_credentials(tls))
        if self.grpc_port == 0:
            raise RuntimeError(f"cannot bind gRPC to {s.grpc_host}:{s.grpc_port}")
        if s.mtls:
            assert tls is not None  # settings refuse mtls with insecure
            self.mtls_port = self._grpc.add_secure_port(f"{s.grpc_host}:{s.mtls_port}", self._mtls_credentials(tls))
            if self.mtls_port == 0:
                raise RuntimeError(f"cannot bind the mTLS port to {s.grpc_host}:{s.mtls_port}")
            servicer.mtls_port = self.mtls_port
            log.info("mutual TLS: port %d requires client certificates; port %d serves only Register",
                     self.mtls_port, self.grpc_port)
        self._grpc.start()
        sock = _bind(s.rest_host, s.rest_port)
        self.rest_port = sock.getsockname()[1]
        # uvicorn wraps the socket handed to it with this TLS context too (loop.create_server(ssl=)).
        ssl_files = {} if tls is None else {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        config = uvicorn.Config(create_app(self.ctx), log_level=s.log_level.lower(), access_log=False, lifespan="on",
                                **ssl_files)
        self._uvicorn = uvicorn.Server(config)
        self._rest_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="rest", daemon=True)
        self._rest_thread.start()
        if self.worker is not None:
            self.worker.start()
        log.info("EdgeLoop server: REST %s://%s:%d/api/v1 (docs /docs), gRPC %s:%d (%s)",
                 "http" if tls is None else "https", s.rest_host, self.rest_port, s.grpc_host, self.grpc_port,
                 "plaintext" if tls is None else "TLS")

    def write_ready_file(self, path: Path) -> None:
        """Tell a supervising process (fleet runner, tests) the ports actually bound."""
        tmp = path.with_suffix(".tmp")
        tls = self.tls
        tmp.write_text(json.dumps({"pid": os.getpid(), "rest_port": self.rest_port, "grpc_port": self.grpc_port,
                                   "mtls_port": self.mtls_port,
                                   "tls": tls is not None,
                                   "ca_file": str(tls.ca_file) if tls is not None and tls.ca_file else None,
                                   "ca_fingerprint": tls.ca_fingerprint if tls is not None else None}))
        os.replace(tmp, path)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping server")
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            self._grpc.stop(grace)  # ends the watch streams, flushes pending heartbeats
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
