"""gRPC client for the EdgeFleet service: the only module of the agent that speaks gRPC.

Errors are sorted into two kinds the daemon acts on: :class:`TransientError` (server down,
link broken, timeout: retry with backoff) and :class:`PermanentError` (the request itself is
wrong). :class:`CredentialRejected` means the server no longer knows this device.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterator

import grpc

from edge_agent.backoff import RetryAfter, retry_after_s
from edge_agent.tls import ClientCertStore, PinnedCA, TLSSetupError
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
    """``retry_after_s``: the server's RESOURCE_EXHAUSTED hint (0: none); Backoff.next_delay
    never waits less."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class TransientError(ClientError):
    """Retry later."""


class PermanentError(ClientError):
    """Retrying the same request will not help."""


class CredentialRejected(PermanentError):
    """UNAUTHENTICATED: register again."""


class TLSError(TransientError):
    """The server's certificate does not verify against the pinned CA (or the CA could not be
    fetched by its fingerprint). Retried with backoff, like an outage: the operator may be
    fixing the server; the running model is kept meanwhile."""


# How gRPC core words a failed handshake in UNAVAILABLE's details (versions differ in case).
_TLS_MARKERS = ("handshake failed", "certificate_verify_failed", "tsi_protocol_failure", "wrong_version_number",
                "verification check failed")


def classify(exc: grpc.RpcError) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    msg = f"{code.name if code else 'ERROR'}: {detail}"
    if code == grpc.StatusCode.UNAVAILABLE and any(m in (detail or "").lower() for m in _TLS_MARKERS):
        return TLSError(f"TLS: {msg}", code)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CredentialRejected(msg, code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # rate limited: the hint rides in trailing metadata
        meta = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        return TransientError(msg, code, retry_after_s=retry_after_s(meta))
    if code in _TRANSIENT or code is None:
        return TransientError(msg, code)
    return PermanentError(msg, code)


class FleetClient:
    """``tls``: the pinned CA (the daemon builds it from the settings); ``None`` is a plaintext
    channel, which only ``--insecure`` asks for (and tests against a plaintext server).
    ``server_name``: the name to verify in the server certificate instead of the host dialled."""

    RENEW_RETRY_S = 60.0  # a failed certificate renewal is retried at most this often

    def __init__(self, address: str, *, timeout_s: float = 30.0, max_message_bytes: int = 8 << 20,
                 tls: PinnedCA | None = None, server_name: str = "", client_cert: ClientCertStore | None = None) -> None:
        """``client_cert``: where the mutual-TLS key and certificate live (with ``tls``): a CSR goes
        with every Register, and once the server issued a certificate every other call uses its
        mTLS port with it (docs/security.md#mutual-tls)."""
        self.address = address
        self.client_cert = client_cert if tls is not None else None
        self._mtls: tuple[grpc.Channel, pb_grpc.EdgeFleetStub, object] | None = None  # channel, stub, cert
        self._renew_after = 0.0
        self.timeout_s = timeout_s
        self.credential = ""
        self.retry_after = RetryAfter()  # the server's latest retry-after hint: no call before it
        self.tls = tls
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Reconnect quickly after the server comes back (default max backoff is 120 s).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channel: grpc.Channel | None = None
        self._stub_obj: pb_grpc.EdgeFleetStub | None = None
        self._channel_lock = threading.Lock()
        if tls is None:
            self._stub  # noqa: B018 - a plaintext channel needs nothing fetched: build it now

    @property
    def _stub(self) -> pb_grpc.EdgeFleetStub:
        """Built on first use: pinning by fingerprint fetches the CA from the server, which may
        be down at start (that surfaces as a TLSError the services back off from)."""
        with self._channel_lock:
            if self._stub_obj is None:
                if self.tls is None:
                    self._channel = grpc.insecure_channel(self.address, options=self._options)
                else:
                    try:
                        roots = self.tls.root_certificates()
                    except OSError as exc:
                        raise TLSError(f"TLS: cannot pin the server's CA: {exc}") from exc
                    self._channel = grpc.secure_channel(
                        self.address, grpc.ssl_channel_credentials(root_certificates=roots), options=self._options)
                self._stub_obj = pb_grpc.EdgeFleetStub(self._channel)
            return self._stub_obj

    @property
    def _call_stub(self) -> pb_grpc.EdgeFleetStub:
        """The stub for every call but Register: the mTLS port's once a client certificate is
        installed (renewed first when due), else the first port's."""
        if self.client_cert is None:
            return self._stub
        with self._channel_lock:
            if self._mtls is None:
                loaded = self.client_cert.load()
                if loaded is None:
                    stub = None
                else:
                    key_pem, cert_pem, port, cert = loaded
                    host = self.address.rpartition(":")[0]
                    assert self.tls is not None
                    try:
                        roots = self.tls.root_certificates()
                    except OSError as exc:
                        raise TLSError(f"TLS: cannot pin the server's CA: {exc}") from exc
                    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key_pem,
                                                         certificate_chain=cert_pem)
                    channel = grpc.secure_channel(f"{host}:{port}", creds, options=self._options)
                    self._mtls = (channel, pb_grpc.EdgeFleetStub(channel), cert)
        if self._mtls is None:
            return self._stub
        _, stub, cert = self._mtls
        if self.client_cert.renewal_due(cert) and time.monotonic() >= self._renew_after:  # type: ignore[arg-type]
            self._renew(stub)
            return self._call_stub  # the new certificate's channel (renewal is throttled: no loop)
        return stub

    def _renew(self, stub: pb_grpc.EdgeFleetStub) -> None:
        """A new key and certificate at two thirds of the old one's lifetime; on failure the old
        one stays in use (until it expires) and renewal is retried a minute later."""
        assert self.client_cert is not None
        self._renew_after = time.monotonic() + self.RENEW_RETRY_S
        try:
            csr = self.client_cert.new_csr()
            resp = stub.RenewClientCertificate(pb.RenewClientCertificateRequest(csr=csr), timeout=self.timeout_s,
                                               metadata=self._md())
            cert = self.client_cert.install(resp.client_certificate)
        except (grpc.RpcError, TLSSetupError, OSError) as exc:
            log.warning("client certificate renewal failed (retrying later, the current one stays): %s", exc)
            self.client_cert.discard_pending()
            return
        log.info("renewed the client certificate (valid until %s)", f"{cert.not_valid_after_utc:%Y-%m-%d}")
        self._reset_mtls()

    def _reset_mtls(self) -> None:
        with self._channel_lock:
            if self._mtls is not None:
                self._mtls[0].close()
                self._mtls = None

    def close(self) -> None:
        with self._channel_lock:
            if self._channel is not None:
                self._channel.close()
            if self._mtls is not None:
                self._mtls[0].close()

    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.credential}")]

    def _wait_turn(self) -> None:
        """Honour the server's retry-after: no call leaves before the last hint has passed."""
        left = self.retry_after.remaining()
        if left > 0:
            raise TransientError(f"RESOURCE_EXHAUSTED: holding off {left:.3g} s as the server asked",
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=left)

    def _failed(self, exc: grpc.RpcError) -> ClientError:
        err = classify(exc)
        self.retry_after.hold(err.retry_after_s)
        return err

    def register(self, *, enrollment_token: str, hardware_id: str, name: str, tags: list[str],
                 agent_version: str) -> pb.RegisterResponse:
        req = pb.RegisterRequest(
            enrollment_token=enrollment_token, hardware_id=hardware_id, name=name, tags=tags,
            hardware={"machine": platform.machine(), "system": platform.system(), "python": platform.python_version()},
            agent_version=agent_version,
        )
        if self.client_cert is not None:  # a server with mtls off ignores it
            req.client_csr = self.client_cert.new_csr()
        try:
            self._wait_turn()
            resp = self._stub.Register(req, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc
        if self.client_cert is not None:
            self._reset_mtls()
            if resp.client_certificate:
                try:
                    self.client_cert.install(resp.client_certificate, resp.mtls_port)
                except TLSSetupError as exc:
                    raise PermanentError(str(exc)) from exc
                log.info("mutual TLS: client certificate installed; calls go to port %d", resp.mtls_port)
            else:  # mtls off: calls stay on this port
                self.client_cert.clear()
        return resp

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        try:
            self._wait_turn()
            return self._call_stub.Heartbeat(req, timeout=self.timeout_s, metadata=self._md())
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc

    def upload(self, samples: list[QueuedSample], per_message: int = 64) -> pb.UploadSamplesResponse:
        def messages() -> Iterator[pb.UploadSamplesRequest]:
            for i in range(0, len(samples), per_message):
                yield pb.UploadSamplesRequest(samples=[
                    pb.Sample(sample_id=s.sample_id, payload=s.payload, label=s.label, metadata=s.metadata,
                              captured_at_unix_ms=int(s.captured_at * 1000))
                    for s in samples[i : i + per_message]
                ])
        try:
            self._wait_turn()
            return self._call_stub.UploadSamples(messages(), timeout=self.timeout_s * 4, metadata=self._md())
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc

    def get_update(self, req: pb.GetUpdateRequest, timeout_s: float | None = None) -> Iterator[pb.GetUpdateResponse]:
        """Yields the UpdateInfo message then chunks; raises ClientError on failure."""
        try:
            self._wait_turn()
            yield from self._call_stub.GetUpdate(req, timeout=timeout_s or self.timeout_s * 20, metadata=self._md())
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc

    def watch(self, model_hash: str, max_seconds: int = 0) -> Iterator[pb.WatchUpdatesResponse]:
        try:
            self._wait_turn()
            yield from self._call_stub.WatchUpdates(
                pb.WatchUpdatesRequest(model_hash=model_hash, max_seconds=max_seconds),
                timeout=(max_seconds or 3600) + 30, metadata=self._md())
        except grpc.RpcError as exc:
            raise self._failed(exc) from exc
