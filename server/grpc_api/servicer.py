"""gRPC servicer for agents: thin handlers that authenticate, call the domain layer, and map
domain errors to status codes."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server import signing
from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Delivery, Device, DeviceClientCertificate, ModelVersion
from server.domain import devices as D
from server.domain import enrollment
from server.domain.errors import (
    ConflictError,
    DomainError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from server.domain.samples import SampleIn, ingest_samples
from server.domain.versions import get_version, plan_update
from server.grpc_api.ratelimit import RateLimited, RateLimiter, StreamLimiter
from server.notifier import Notifier
from server.settings import ServerSettings
from server.store.blobs import BlobStore
from server.tls import (
    IssuedClientCert,
    ensure_ca,
    fingerprint,
    issue_client_cert,
    load_csr,
    peer_certificate,
)

log = logging.getLogger(__name__)

_STATUS = {
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED (docs/protocol.md)
MIN_CHUNK_BYTES = 1 << 10  # a smaller max_chunk_bytes is raised to this (docs/protocol.md)
MAX_CHUNK_BYTES = 4 << 20  # and a larger one lowered to this (and below the message limit)
_HASH = re.compile(r"[0-9a-f]{64}")  # model hashes and artefact SHA-256s: lowercase hex


def check_hash(value: str, field: str) -> None:
    """Empty or 64 lowercase hex; anything else is INVALID_ARGUMENT, never NOT_FOUND (which
    tells a client to retry a request that can never succeed)."""
    if value and not _HASH.fullmatch(value):
        raise InvalidArgumentError(f"{field} must be empty or 64 lowercase hex characters")


def check_update_request(request: pb.GetUpdateRequest) -> None:
    for field in ("target_model_hash", "have_model_hash", "artefact_sha256"):
        check_hash(getattr(request, field), field)
    if request.offset < 0:
        raise InvalidArgumentError(f"offset {request.offset} is negative")
    if request.offset and not request.artefact_sha256:
        raise InvalidArgumentError("offset without artefact_sha256: a resume must name the artefact it resumes")
    if request.max_chunk_bytes < 0:
        raise InvalidArgumentError(f"max_chunk_bytes {request.max_chunk_bytes} is negative (0: server default)")


def chunk_size(requested: int, settings: ServerSettings) -> int:
    """0: the server default; otherwise clamped to [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES] and
    1 KiB under the message limit (room for the Chunk's framing)."""
    chunk = requested or settings.chunk_bytes
    return max(MIN_CHUNK_BYTES, min(chunk, MAX_CHUNK_BYTES, settings.grpc_max_message_bytes - 1024))


def credential_from(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


def peer_source(peer: str) -> str:
    """The rate-limit key of a gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``): its
    address without the port; IPv6 by /64, the block one host usually holds."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return peer  # unix sockets and the like: one key per peer string


@contextmanager
def domain_errors(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except RateLimited as exc:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except DomainError as exc:
        code = next((c for t, c in _STATUS.items() if isinstance(exc, t)), grpc.StatusCode.INVALID_ARGUMENT)
        context.abort(code, str(exc))


class FleetServicer(pb_grpc.EdgeFleetServicer):
    def __init__(
        self, settings: ServerSettings, factory: sessionmaker[Session], blobs: BlobStore, targets_changed: Notifier
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.blobs = blobs
        self.targets_changed = targets_changed
        # docs/security.md "Abuse limits": per device on authenticated calls, per source
        # address on failed Registers.
        self.device_limits = RateLimiter(settings.device_rate_per_s, settings.device_burst,
                                         max_keys=settings.rate_limit_max_keys)
        self.register_limits = RateLimiter(settings.register_rate_per_s, settings.register_burst,
                                           max_keys=settings.rate_limit_max_keys)
        # Each open stream holds a handler thread: a cap per device keeps one device from
        # taking the pool (grpc_max_workers) from the rest of the fleet.
        self.device_streams = StreamLimiter(settings.device_max_streams)
        # Mutual TLS (docs/security.md#mutual-tls): the local CA issues client certificates at
        # Register; every other call must come over the mTLS port (mtls_port, set by the server
        # once bound) with a certificate issued to the device whose credential it presents.
        self.mtls = settings.mtls
        self.mtls_port = settings.mtls_port
        self._client_ca = ensure_ca(settings.data_dir)[:2] if self.mtls else None

    def _device(self, session: Session, context: grpc.ServicerContext) -> Device:
        device = D.authenticate(session, credential_from(context))  # refuses revoked devices
        if self.mtls:
            self._check_client_cert(session, device, context)
        self.device_limits.acquire(device.id, f"device {device.id}")
        return device

    def _check_client_cert(self, session: Session, device: Device, context: grpc.ServicerContext) -> None:
        """The peer certificate (verified against the local CA by gRPC on the mTLS port) must be
        one the server issued to ``device``, unexpired and not revoked; checked on every call."""
        cert = peer_certificate(dict(context.auth_context() or {}))
        if cert is None:  # the first port: it never asks for a certificate
            raise UnauthenticatedError(
                f"this server requires mutual TLS: call port {self.mtls_port} with the client certificate issued "
                "at Register (register again, with a client_csr, to get one)")
        row = session.get(DeviceClientCertificate, fingerprint(cert))
        if row is None or row.device_id != device.id:
            raise UnauthenticatedError(f"the client certificate was not issued to device {device.id}")
        if row.revoked_at is not None:
            raise UnauthenticatedError(f"client certificate {row.serial} of device {device.id} was replaced; "
                                       "use the newest one")
        not_after = row.not_after if row.not_after.tzinfo else row.not_after.replace(tzinfo=utcnow().tzinfo)
        if not_after <= utcnow():
            raise UnauthenticatedError(f"client certificate {row.serial} of device {device.id} expired")

    def _csr(self, data: bytes, field: str):  # noqa: ANN202 - x509.CertificateSigningRequest
        if not data:
            raise InvalidArgumentError(f"this server requires mutual TLS: send {field} (a CSR for a key made "
                                       "on the device; docs/protocol.md#mutual-tls)")
        try:
            return load_csr(data)
        except ValueError as exc:
            raise InvalidArgumentError(f"{field}: {exc}") from exc

    def _issue(self, session: Session, device_id: str, csr) -> IssuedClientCert:  # noqa: ANN001
        assert self._client_ca is not None
        issued = issue_client_cert(*self._client_ca, csr, device_id, self.settings.client_cert_days)
        session.add(DeviceClientCertificate(fingerprint=issued.fingerprint, device_id=device_id,
                                            serial=issued.serial, not_after=issued.not_after))
        return issued

    def _stream_slot(self, device_id: str, context: grpc.ServicerContext, what: str) -> Callable[[], None]:
        """Takes one of the device's stream slots (RateLimited over the cap), released when
        the RPC ends however it ends (the callback) or when the handler returns (the caller's
        ``finally``), whichever comes first."""
        release = self.device_streams.open(device_id, f"device {device_id} {what}")
        if not context.add_callback(release):
            release()  # the RPC has already ended
            context.abort(grpc.StatusCode.CANCELLED, "call ended")
        return release

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        source = peer_source(context.peer() or "")
        with domain_errors(context):
            # Every attempt takes a token and a success gives it back: only failures count,
            # and concurrent guesses cannot all slip in before the first one fails.
            self.register_limits.acquire(source, f"Register from {source}")
            try:
                csr = self._csr(request.client_csr, "client_csr") if self.mtls else None
                with transaction(self.factory) as s:
                    reg = enrollment.register(
                        s, enrollment_token=request.enrollment_token, hardware_id=request.hardware_id,
                        name=request.name, tags=list(request.tags), hardware=dict(request.hardware),
                        agent_version=request.agent_version,
                    )
                    resp = pb.RegisterResponse(
                        device_id=reg.device.id, device_credential=reg.credential,
                        target_model_hash=reg.device.target_model_hash,
                        heartbeat_interval_s=self.settings.heartbeat_interval_s,
                        signing_public_keys=signing.trusted_public_keys(s),  # pinned at enrollment
                    )
                    if csr is not None:
                        # A new credential: the certificates issued with the old one are retired.
                        s.execute(update(DeviceClientCertificate).where(
                            DeviceClientCertificate.device_id == reg.device.id,
                            DeviceClientCertificate.revoked_at.is_(None)).values(revoked_at=utcnow()))
                        issued = self._issue(s, reg.device.id, csr)
                        resp.client_certificate, resp.mtls_port = issued.pem, self.mtls_port
            except DomainError as exc:
                log.warning("Register from %s refused: %s", source, exc)
                raise
            self.register_limits.refund(source)
            log.info("registered device %s (%s) from %s", reg.device.id, reg.device.name, source)
            return resp

    def RenewClientCertificate(self, request: pb.RenewClientCertificateRequest,
                               context: grpc.ServicerContext) -> pb.RenewClientCertificateResponse:
        with domain_errors(context):
            if not self.mtls:
                raise ConflictError("mutual TLS is off on this server (setting mtls)")
            csr = self._csr(request.csr, "csr")
            with transaction(self.factory) as s:
                device = self._device(s, context)  # the credential and the current certificate
                issued = self._issue(s, device.id, csr)
            log.info("renewed the client certificate of device %s (serial %s, until %s)", device.id,
                     issued.serial, f"{issued.not_after:%Y-%m-%d}")
            return pb.RenewClientCertificateResponse(client_certificate=issued.pem)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        with domain_errors(context), transaction(self.factory) as s:
            device = self._device(s, context)
            budget = {f: getattr(request.budget, f) for f in ("latency_ms", "memory_mb", "energy_mj")
                      if request.budget.HasField(f)}
            D.record_heartbeat(
                s, device, model_hash=request.model_hash, active_subnet=request.active_subnet, budget=budget,
                metrics=dict(request.metrics), state=request.state, last_error=request.last_error,
                samples_pending=request.samples_pending,
                rollbacks=[{"model_hash": r.model_hash, "reason": r.reason, "at_ms": r.at_ms}
                           for r in request.rollbacks],
            )
            target = s.get(ModelVersion, device.target_model_hash) if device.target_model_hash else None
            accs = (target.metrics or {}).get("subnet_val_accuracy") if target is not None else None
            return pb.HeartbeatResponse(
                target_model_hash=device.target_model_hash, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                server_time_unix_ms=int(time.time() * 1000),
                target_subnet_accuracy=[float(a) for a in accs or []],
            )

    def UploadSamples(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadSamplesResponse:
        with domain_errors(context):
            with transaction(self.factory) as s:
                device_id = self._device(s, context).id
            release = self._stream_slot(device_id, context, "UploadSamples")
        try:
            return self._upload(device_id, request_iterator, context)
        finally:
            release()

    def _upload(self, device_id: str, request_iterator, context: grpc.ServicerContext) -> pb.UploadSamplesResponse:
        with domain_errors(context):
            samples: list[SampleIn] = []
            total_bytes = 0
            for msg in request_iterator:
                total_bytes += msg.ByteSize()
                if total_bytes > self.settings.max_upload_bytes:
                    raise InvalidArgumentError(
                        f"upload stream exceeds {self.settings.max_upload_bytes} bytes; split the upload")
                for smp in msg.samples:
                    samples.append(SampleIn(
                        sample_id=smp.sample_id, payload=smp.payload,
                        label=smp.label if smp.HasField("label") else None,
                        metadata=dict(smp.metadata), captured_at_ms=smp.captured_at_unix_ms,
                    ))
                if len(samples) > self.settings.max_samples_per_upload:
                    raise InvalidArgumentError(
                        f"more than {self.settings.max_samples_per_upload} samples in one stream; split the upload")
            with transaction(self.factory) as s:
                device = s.get(Device, device_id)
                result = ingest_samples(s, self.blobs, device, samples, arch=self.settings.arch,
                                        max_bytes=self.settings.max_sample_bytes,
                                        value_abs_max=self.settings.sample_value_abs_max)
            # The transaction has committed: only now is it safe to acknowledge.
            if result.rejected:
                log.warning("device %s: %d samples rejected (first: %s)", device_id, len(result.rejected),
                            result.rejected[0][1])
            return pb.UploadSamplesResponse(
                accepted=result.accepted, duplicates=result.duplicates, committed_ids=result.committed_ids,
                rejected=[pb.RejectedSample(sample_id=i, reason=r) for i, r in result.rejected],
            )

    def GetUpdate(self, request: pb.GetUpdateRequest, context: grpc.ServicerContext) -> Iterator[pb.GetUpdateResponse]:
        with domain_errors(context):
            with transaction(self.factory) as s:
                device_id = self._device(s, context).id
            release = self._stream_slot(device_id, context, "GetUpdate")
        try:
            yield from self._get_update(request, context)
        finally:
            release()

    def _get_update(self, request: pb.GetUpdateRequest, context: grpc.ServicerContext) -> Iterator[pb.GetUpdateResponse]:
        with domain_errors(context):
            with transaction(self.factory) as s:
                device = D.authenticate(s, credential_from(context))  # rate-limited above; now judge the request
                check_update_request(request)
                target = request.target_model_hash or device.target_model_hash
                if not target:
                    raise NotFoundError("no model version is assigned to this device yet")
                get_version(s, target)
                if request.have_model_hash == target:
                    # Up to date: an UpdateInfo naming no artefact, then no chunks (never the
                    # whole model again). Nothing is delivered, so nothing is recorded.
                    up_to_date = pb.UpdateInfo(target_model_hash=target, final_model_hash=target)
                else:
                    up_to_date = None
                    info, offset = self._plan(s, request, target)
                    device_id = device.id
            if up_to_date is not None:
                yield pb.GetUpdateResponse(info=up_to_date)
                return
            chunk = chunk_size(request.max_chunk_bytes, self.settings)
        yield pb.GetUpdateResponse(info=info)
        sent = 0
        try:
            pos = offset
            while pos < info.artefact_size and context.is_active():
                data = self.blobs.read_range(info.artefact_sha256, pos, chunk)
                if not data:
                    break
                yield pb.GetUpdateResponse(chunk=pb.Chunk(offset=pos, data=data))
                pos += len(data)
                sent += len(data)
        finally:
            self._record_delivery(device_id, info, sent, complete=offset + sent >= info.artefact_size)

    @staticmethod
    def _plan(s: Session, request: pb.GetUpdateRequest, target: str) -> tuple[pb.UpdateInfo, int]:
        plan = plan_update(s, have_hash=request.have_model_hash, target_hash=target)
        art = plan.artefact
        if request.artefact_sha256 and request.artefact_sha256 != art.sha256:
            # Resuming an artefact that is no longer the best choice: restart cleanly.
            offset = 0
        else:
            offset = request.offset
        if offset > art.size:
            raise InvalidArgumentError(f"offset {offset} outside [0, {art.size}]")
        sigs = signing.signatures_of(s, art.sha256)
        if not sigs:  # external signing: the key holder has not signed it yet
            raise ConflictError(f"artefact {art.sha256[:12]} is not signed yet; retry later")
        info = pb.UpdateInfo(
            artefact_sha256=art.sha256, artefact_size=art.size, encoding=art.encoding,
            base_model_hash=art.base_model_hash or "", target_model_hash=art.target_model_hash,
            final_model_hash=plan.final_hash, offset=offset,
            signatures=[pb.ArtefactSignature(key_id=r.key_id, signature=bytes(r.signature)) for r in sigs],
            key_announcements=[pb.KeyAnnouncement(statement=bytes(r.statement), signature=bytes(r.signature))
                               for r in signing.key_statements(s)],
        )
        return info, offset

    def _record_delivery(self, device_id: str, info: pb.UpdateInfo, sent: int, complete: bool) -> None:
        try:
            with transaction(self.factory) as s:
                row = s.scalars(select(Delivery).where(
                    Delivery.device_id == device_id, Delivery.artefact_sha256 == info.artefact_sha256)).first()
                if row is None:
                    row = Delivery(device_id=device_id, artefact_sha256=info.artefact_sha256,
                                   target_model_hash=info.target_model_hash, final_model_hash=info.final_model_hash)
                    s.add(row)
                row.bytes_sent = (row.bytes_sent or 0) + sent
                row.completed = row.completed or complete
                row.updated_at = utcnow()
        except Exception:  # noqa: BLE001 - accounting must never break a download
            log.exception("could not record delivery to %s", device_id)

    def WatchUpdates(self, request: pb.WatchUpdatesRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchUpdatesResponse]:
        with domain_errors(context):
            with transaction(self.factory) as s:
                device_id = self._device(s, context).id
                check_hash(request.model_hash, "model_hash")
            release = self._stream_slot(device_id, context, "WatchUpdates")
        try:
            yield from self._watch(device_id, request, context)
        finally:
            release()

    def _watch(self, device_id: str, request: pb.WatchUpdatesRequest,
               context: grpc.ServicerContext) -> Iterator[pb.WatchUpdatesResponse]:
        # A cancelled stream wakes its handler thread at once instead of at the next keepalive.
        context.add_callback(self.targets_changed.notify)
        limit = self.settings.watch_max_seconds
        if request.max_seconds > 0:
            limit = min(limit, request.max_seconds)
        deadline = time.monotonic() + limit
        last_sent: str | None = None
        seen = self.targets_changed.generation
        while context.is_active() and time.monotonic() < deadline:
            with transaction(self.factory) as s:
                device = s.get(Device, device_id)
                if device is None or device.revoked:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "device revoked")
                target = device.target_model_hash
                mv = s.get(ModelVersion, target) if target and target != last_sent else None
                round_id = (mv.round_id or "") if mv else ""
            if target != last_sent:
                yield pb.WatchUpdatesResponse(target_model_hash=target, keepalive=False, round_id=round_id)
                last_sent = target
            else:
                yield pb.WatchUpdatesResponse(target_model_hash=target, keepalive=True)
            wait = min(self.settings.watch_keepalive_s, max(0.0, deadline - time.monotonic()))
            seen = self.targets_changed.wait(seen, wait)
