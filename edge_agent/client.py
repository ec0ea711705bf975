"""gRPC client for the EdgeFleet service: the only module of the agent that speaks gRPC.

Errors are sorted into two kinds the daemon acts on: :class:`TransientError` (server down,
link broken, timeout: retry with backoff) and :class:`PermanentError` (the request itself is
wrong). :class:`CredentialRejected` means the server no longer knows this device.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator

import grpc

from edge_agent.upload_queue import QueuedSample
from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class ClientError(Exception):
    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientError(ClientError):
    """Retry later."""


class PermanentError(ClientError):
    """Retrying the same request will not help."""


class CredentialRejected(PermanentError):
    """UNAUTHENTICATED: register again."""


def classify(exc: grpc.RpcError) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    msg = f"{code.name if code else 'ERROR'}: {detail}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CredentialRejected(msg, code)
    if code in _TRANSIENT or code is None:
        return TransientError(msg, code)
    return PermanentError(msg, code)


class FleetClient:
    def __init__(self, address: str, *, timeout_s: float = 30.0, max_message_bytes: int = 8 << 20) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.credential = ""
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Reconnect quickly after the server comes back (default max backoff is 120 s).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ])
        self._stub = pb_grpc.EdgeFleetStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.credential}")]

    def register(self, *, enrollment_token: str, hardware_id: str, name: str, tags: list[str],
                 agent_version: str) -> pb.RegisterResponse:
        req = pb.RegisterRequest(
            enrollment_token=enrollment_token, hardware_id=hardware_id, name=name, tags=tags,
            hardware={"machine": platform.machine(), "system": platform.system(), "python": platform.python_version()},
            agent_version=agent_version,
        )
        try:
            return self._stub.Register(req, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise classify(exc) from exc

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        try:
            return self._stub.Heartbeat(req, timeout=self.timeout_s, metadata=self._md())
        except grpc.RpcError as exc:
            raise classify(exc) from exc

    def upload(self, samples: list[QueuedSample], per_message: int = 64) -> pb.UploadSamplesResponse:
        def messages() -> Iterator[pb.UploadSamplesRequest]:
            for i in range(0, len(samples), per_message):
                yield pb.UploadSamplesRequest(samples=[
                    pb.Sample(sample_id=s.sample_id, payload=s.payload, label=s.label, metadata=s.metadata,
                              captured_at_unix_ms=int(s.captured_at * 1000))
                    for s in samples[i : i + per_message]
                ])
        try:
            return self._stub.UploadSamples(messages(), timeout=self.timeout_s * 4, metadata=self._md())
        except grpc.RpcError as exc:
            raise classify(exc) from exc

    def get_update(self, req: pb.GetUpdateRequest, timeout_s: float | None = None) -> Iterator[pb.GetUpdateResponse]:
        """Yields the UpdateInfo message then chunks; raises ClientError on failure."""
        try:
            yield from self._stub.GetUpdate(req, timeout=timeout_s or self.timeout_s * 20, metadata=self._md())
        except grpc.RpcError as exc:
            raise classify(exc) from exc

    def watch(self, model_hash: str, max_seconds: int = 0) -> Iterator[pb.WatchUpdatesResponse]:
        try:
            yield from self._stub.WatchUpdates(
                pb.WatchUpdatesRequest(model_hash=model_hash, max_seconds=max_seconds),
                timeout=(max_seconds or 3600) + 30, metadata=self._md())
        except grpc.RpcError as exc:
            raise classify(exc) from exc
