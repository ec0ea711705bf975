"""A real gRPC server (the async agent server, AgentGrpcServer, on a loopback port) and the
request builders the gRPC tests share."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.db.engine import transaction
from server.domain import enrollment
from server.grpc_api.aio_server import AgentGrpcServer
from shared.samples import encode_sample, sample_id


@functools.lru_cache(maxsize=1)
def session_tls():
    """One local CA and server certificate (localhost, 127.0.0.1, ::1) per test session, made
    by the product's own server/tls.py: TLS costs the tests a handshake, not a key generation."""
    from server.tls import ensure_server_tls

    return ensure_server_tls(Path(tempfile.mkdtemp(prefix="edgeloop-test-tls-")),
                             hostnames=["localhost", "127.0.0.1", "::1"], cert_days=30)


def harness_settings(settings, overrides: dict):
    """The test servers' settings: heartbeats written before they are answered
    (``heartbeat_flush_s=0``) so a test may read what a heartbeat stored right after it;
    tests/server/test_async_server.py covers the batched path (and passes its own value)."""
    return settings.model_copy(update={"heartbeat_flush_s": 0.0, **overrides})


class Fleet:
    """A running gRPC server (AgentGrpcServer on 127.0.0.1:<free port>) and a client stub, over
    TLS with :func:`session_tls` as users run it (``tls=False``: plaintext on both sides)."""

    def __init__(self, ctx, *, tls: bool = True, **overrides) -> None:
        self.ctx = ctx
        self.settings = harness_settings(ctx.settings, overrides)
        self.server = AgentGrpcServer(ctx, self.settings)
        self.tls = session_tls() if tls else None
        if self.tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
                [(self.tls.key_pem, self.tls.chain_pem)]))
        assert self.port > 0
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = self.open_channel()
        self.stub = pb_grpc.EdgeFleetStub(self.channel)

    def open_channel(self) -> grpc.Channel:
        """A new channel to this server, pinning the session CA when TLS is on."""
        if self.tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.tls.ca_file.read_bytes()))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)

    @property
    def enrollment_token(self) -> str:
        """This fleet's enrollment token (created on first use, many uses): ``register``'s default."""
        if not hasattr(self, "_enrollment_token"):
            self._enrollment_token = create_enrollment_token(self.ctx)
        return self._enrollment_token

    def register(self, hardware_id: str = "hw-1", **kw) -> pb.RegisterResponse:
        token = kw.pop("token") if "token" in kw else self.enrollment_token
        return self.stub.Register(pb.RegisterRequest(enrollment_token=token, hardware_id=hardware_id, **kw),
                                  timeout=10)


def create_enrollment_token(ctx, **kw) -> str:
    """A new enrollment token on ``ctx``'s database (``kw``: enrollment.create_token's options;
    by default 1000 uses for a day); returns the secret."""
    kw = {"name": "tests", "max_uses": 1000, **kw}
    with transaction(ctx.factory) as s:
        return enrollment.create_token(s, **kw).secret


def md(credential: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {credential}")]


def pb_sample(x: np.ndarray, label: int | None = None) -> pb.Sample:
    payload = encode_sample(x)
    s = pb.Sample(sample_id=sample_id(payload), payload=payload, captured_at_unix_ms=1_700_000_000_000)
    if label is not None:
        s.label = label
    return s


def stream(samples: list[pb.Sample], per_message: int = 8) -> Iterator[pb.UploadSamplesRequest]:
    for i in range(0, len(samples), per_message):
        yield pb.UploadSamplesRequest(samples=samples[i : i + per_message])
