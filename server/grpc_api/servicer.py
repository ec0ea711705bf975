"""gRPC servicer for agents (grpc.aio): thin async handlers that authenticate, call the domain
layer on the bounded database pool (server/grpc_api/blocking.py), and map domain errors to
status codes. An open WatchUpdates stream is a coroutine waiting on a timer: no thread, no
polling (server/grpc_api/hub.py); heartbeats are answered from memory and written in batches
(server/grpc_api/heartbeats.py)."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import grpc
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server import signing
from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Delivery, Device, DeviceClientCertificate
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
from server.grpc_api.blocking import BlockingPool, Overloaded
from server.grpc_api.heartbeats import CredentialCache, HeartbeatBatcher
from server.grpc_api.hub import REVOKED, STOPPING, StreamHub, Target
from server.grpc_api.ratelimit import RateLimited, RateLimiter, StreamLimiter
from server.notifier import Notifier, Payload
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
PLAN_CACHE_S = 5.0  # how long a GetUpdate plan is reused for other devices (FleetServicer._cached_plan)
PLAN_CACHE_MAX = 1024  # distinct (have, target) pairs held at most
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


def credential_from(context: grpc.aio.ServicerContext) -> str:
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


@asynccontextmanager
async def domain_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except RateLimited as exc:  # also Overloaded: the database pool's queue is full
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                            trailing_metadata=((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
    except DomainError as exc:
        code = next((c for t, c in _STATUS.items() if isinstance(exc, t)), grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(code, str(exc))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)  # SQLite drops the zone


class FleetServicer(pb_grpc.EdgeFleetServicer):
    """Runs on the agent server's event loop (server/grpc_api/aio_server.py builds it)."""

    def __init__(self, settings: ServerSettings, factory: sessionmaker[Session], blobs: BlobStore, *,
                 targets_changed: Notifier, devices_changed: Notifier, pool: BlockingPool) -> None:
        self.settings = settings
        self.factory = factory
        self.blobs = blobs
        self.targets_changed = targets_changed
        self.devices_changed = devices_changed
        self.pool = pool
        # docs/security.md "Abuse limits": per device on authenticated calls, per source
        # address on failed Registers.
        self.device_limits = RateLimiter(settings.device_rate_per_s, settings.device_burst,
                                         max_keys=settings.rate_limit_max_keys)
        self.register_limits = RateLimiter(settings.register_rate_per_s, settings.register_burst,
                                           max_keys=settings.rate_limit_max_keys)
        # Streams cost no thread any more, but each holds memory and a connection: a cap per
        # device keeps one device from holding an unbounded number open.
        self.device_streams = StreamLimiter(settings.device_max_streams)
        # Mutual TLS (docs/security.md#mutual-tls): the local CA issues client certificates at
        # Register; every other call must come over the mTLS port (mtls_port, set by the server
        # once bound) with a certificate issued to the device whose credential it presents.
        self.mtls = settings.mtls
        self.mtls_port = settings.mtls_port
        self._client_ca = ensure_ca(settings.data_dir)[:2] if self.mtls else None
        self.credentials = CredentialCache(max_entries=settings.rate_limit_max_keys)
        self.hub = StreamHub(factory, pool.run, resync_s=4 * settings.watch_keepalive_s)
        self.hub.on_credentials = self.credentials.sync
        self.heartbeats = HeartbeatBatcher(factory, settings.heartbeat_flush_s, pool.run)
        self._unsubscribe: Callable[[], None] | None = None
        self._plans: dict[tuple[str, str], tuple[float, pb.UpdateInfo]] = {}  # (have, target) -> plan
        self._unsubscribe_plans = targets_changed.subscribe(lambda _payload: self._plans.clear())

    # --- lifecycle (on the loop) ---------------------------------------------------------

    def start(self) -> None:
        self.hub.start(self.targets_changed, self.devices_changed)
        self._unsubscribe = self.devices_changed.subscribe(self._device_changed)
        self.heartbeats.start()

    async def stop(self) -> None:
        """End the watch streams (agents reconnect) and write the pending heartbeats."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._unsubscribe_plans()
        await self.hub.stop()
        await self.heartbeats.stop()

    def _device_changed(self, payload: Payload) -> None:
        """devices_changed (any thread): the device's cached credentials are dropped at once."""
        device_id = (payload or {}).get("device_id")
        if device_id:
            self.credentials.drop_device(device_id)
        elif payload is None:  # the bus reconnected: anything may have changed
            self.credentials.drop_all()

    # --- authentication ------------------------------------------------------------------

    async def _device_id(self, context: grpc.aio.ServicerContext) -> str:
        """The authenticated, rate-limited device of the call: from the credential cache, or
        one database check (credential, not revoked, and with mTLS the client certificate)."""
        credential = credential_from(context)
        if not credential:
            raise UnauthenticatedError("missing device credential (metadata 'authorization: Bearer <credential>')")
        auth = dict(context.auth_context() or {}) if self.mtls else {}
        pems = auth.get("x509_pem_cert") or []
        pem = pems[0] if pems else b""
        key = (D.credential_hash(credential), hashlib.sha256(pem).hexdigest() if pem else "")
        cached = self.credentials.get(key)
        if cached is not None and (cached.cert_not_after is None or cached.cert_not_after > utcnow()):
            device_id = cached.device_id
        else:
            epoch = self.credentials.epoch()
            generation = self.hub.generation
            device_id, target, not_after = await self.pool.run(self._check, credential, auth)
            self.credentials.put(key, device_id, not_after, epoch)
            self.hub.seed(device_id, target, generation)
        self.device_limits.acquire(device_id, f"device {device_id}")
        return device_id

    def _check(self, credential: str, auth: dict) -> tuple[str, str, datetime | None]:
        with transaction(self.factory) as s:
            device = D.authenticate(s, credential)  # refuses revoked devices
            not_after = self._check_client_cert(s, device, auth) if self.mtls else None
            return device.id, device.target_model_hash, not_after

    def _check_client_cert(self, session: Session, device: Device, auth: dict) -> datetime:
        """The peer certificate (verified against the local CA by gRPC on the mTLS port) must be
        one the server issued to ``device``, unexpired and not revoked; checked on every call
        (a cached check holds until the certificate expires or the device changes)."""
        cert = peer_certificate(auth)
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
        not_after = _utc(row.not_after)
        if not_after <= utcnow():
            raise UnauthenticatedError(f"client certificate {row.serial} of device {device.id} expired")
        return not_after

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

    # --- Register ------------------------------------------------------------------------

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        source = peer_source(context.peer() or "")
        async with domain_errors(context):
            # Every attempt takes a token and a success gives it back: only failures count,
            # and concurrent guesses cannot all slip in before the first one fails.
            self.register_limits.acquire(source, f"Register from {source}")
            try:
                csr = self._csr(request.client_csr, "client_csr") if self.mtls else None
                resp, name = await self.pool.run(self._register, request, csr)
            except Overloaded:
                self.register_limits.refund(source)  # not the source's failure
                raise
            except DomainError as exc:
                log.warning("Register from %s refused: %s", source, exc)
                raise
            self.register_limits.refund(source)
            log.info("registered device %s (%s) from %s", resp.device_id, name, source)
            return resp

    def _register(self, request: pb.RegisterRequest, csr) -> tuple[pb.RegisterResponse, str]:  # noqa: ANN001
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
            name = reg.device.name
        # Committed: the old credential (and certificates) are dead here and on other replicas.
        self.devices_changed.notify({"device_id": resp.device_id})
        return resp, name

    async def RenewClientCertificate(self, request: pb.RenewClientCertificateRequest,
                                     context: grpc.aio.ServicerContext) -> pb.RenewClientCertificateResponse:
        async with domain_errors(context):
            if not self.mtls:
                raise ConflictError("mutual TLS is off on this server (setting mtls)")
            csr = self._csr(request.csr, "csr")
            credential = credential_from(context)
            auth = dict(context.auth_context() or {})

            def renew() -> tuple[str, IssuedClientCert]:
                with transaction(self.factory) as s:
                    # The credential and the current certificate, from the database (never the cache).
                    device = D.authenticate(s, credential)
                    self._check_client_cert(s, device, auth)
                    self.device_limits.acquire(device.id, f"device {device.id}")
                    return device.id, self._issue(s, device.id, csr)

            device_id, issued = await self.pool.run(renew)
            log.info("renewed the client certificate of device %s (serial %s, until %s)", device_id,
                     issued.serial, f"{issued.not_after:%Y-%m-%d}")
            return pb.RenewClientCertificateResponse(client_certificate=issued.pem)

    # --- Heartbeat -----------------------------------------------------------------------

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        async with domain_errors(context):
            device_id = await self._device_id(context)
            budget = {f: getattr(request.budget, f) for f in ("latency_ms", "memory_mb", "energy_mj")
                      if request.budget.HasField(f)}
            report = D.heartbeat_report(
                model_hash=request.model_hash, active_subnet=request.active_subnet, budget=budget,
                metrics=dict(request.metrics), state=request.state, last_error=request.last_error,
                samples_pending=request.samples_pending,
                rollbacks=[{"model_hash": r.model_hash, "reason": r.reason, "at_ms": r.at_ms}
                           for r in request.rollbacks],
            )
            current = await self.hub.target(device_id)
            if current is None:  # revoked or gone, and this process missed the event
                self.credentials.drop_device(device_id)
                raise UnauthenticatedError(f"device {device_id} is revoked")
            await self.heartbeats.record(device_id, report)
            target, info = current
            return pb.HeartbeatResponse(
                target_model_hash=target, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                server_time_unix_ms=int(time.time() * 1000),
                target_subnet_accuracy=list(info.subnet_accuracy) if info is not None else [],
            )

    # --- UploadSamples -------------------------------------------------------------------

    async def UploadSamples(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.UploadSamplesResponse:
        async with domain_errors(context):
            device_id = await self._device_id(context)
            release = self.device_streams.open(device_id, f"device {device_id} UploadSamples")
        try:
            return await self._upload(device_id, request_iterator, context)
        finally:
            release()

    async def _upload(self, device_id: str, request_iterator, context: grpc.aio.ServicerContext) -> pb.UploadSamplesResponse:
        async with domain_errors(context):
            samples: list[SampleIn] = []
            total_bytes = 0
            async for msg in request_iterator:
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

            def ingest():  # noqa: ANN202
                with transaction(self.factory) as s:
                    device = s.get(Device, device_id)
                    if device is None:
                        raise UnauthenticatedError(f"device {device_id} no longer exists")
                    return ingest_samples(s, self.blobs, device, samples, arch=self.settings.arch,
                                          max_bytes=self.settings.max_sample_bytes,
                                          value_abs_max=self.settings.sample_value_abs_max)

            result = await self.pool.run(ingest)
            # The transaction has committed: only now is it safe to acknowledge.
            if result.rejected:
                log.warning("device %s: %d samples rejected (first: %s)", device_id, len(result.rejected),
                            result.rejected[0][1])
            return pb.UploadSamplesResponse(
                accepted=result.accepted, duplicates=result.duplicates, committed_ids=result.committed_ids,
                rejected=[pb.RejectedSample(sample_id=i, reason=r) for i, r in result.rejected],
            )

    # --- GetUpdate -----------------------------------------------------------------------

    async def GetUpdate(self, request: pb.GetUpdateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetUpdateResponse]:
        async with domain_errors(context):
            device_id = await self._device_id(context)
            release = self.device_streams.open(device_id, f"device {device_id} GetUpdate")
        try:
            async for msg in self._get_update(request, context, device_id):
                yield msg
        finally:
            release()

    def _cached_plan(self, request: pb.GetUpdateRequest, target: str) -> tuple[pb.UpdateInfo, int] | None:
        """A plan computed for the same (have, target) less than PLAN_CACHE_S ago: a round's
        fan-out asks the same question once per device. Cleared on every targets event (a new
        version may offer a cheaper path); a signature added meanwhile shows at expiry."""
        hit = self._plans.get((request.have_model_hash, target))
        if hit is None or hit[0] < time.monotonic():
            return None
        info = pb.UpdateInfo()
        info.CopyFrom(hit[1])
        offset = 0 if request.artefact_sha256 and request.artefact_sha256 != info.artefact_sha256 else request.offset
        if offset > info.artefact_size:
            raise InvalidArgumentError(f"offset {offset} outside [0, {info.artefact_size}]")
        info.offset = offset
        return info, offset

    def _plan_for(self, request: pb.GetUpdateRequest, credential: str) -> tuple[pb.UpdateInfo | None, int, str]:
        """(UpdateInfo, offset, device id); UpdateInfo without an artefact when up to date."""
        with transaction(self.factory) as s:
            device = D.authenticate(s, credential)  # rate-limited above; now judge the request
            check_update_request(request)
            target = request.target_model_hash or device.target_model_hash
            if not target:
                raise NotFoundError("no model version is assigned to this device yet")
            get_version(s, target)
            if request.have_model_hash == target:
                # Up to date: an UpdateInfo naming no artefact, then no chunks (never the
                # whole model again). Nothing is delivered, so nothing is recorded.
                return pb.UpdateInfo(target_model_hash=target, final_model_hash=target), 0, device.id
            info, offset = self._plan(s, request, target)
            shared = pb.UpdateInfo()
            shared.CopyFrom(info)
            if len(self._plans) >= PLAN_CACHE_MAX:  # bounded: have hashes come from clients
                self._plans.clear()
            self._plans[(request.have_model_hash, target)] = (time.monotonic() + PLAN_CACHE_S, shared)
            return info, offset, device.id

    async def _get_update(self, request: pb.GetUpdateRequest, context: grpc.aio.ServicerContext,
                          device_id: str) -> AsyncIterator[pb.GetUpdateResponse]:
        async with domain_errors(context):
            check_update_request(request)
            current = await self.hub.target(device_id)  # memory, like Heartbeat
            target = request.target_model_hash or (current[0] if current else "")
            cached = self._cached_plan(request, target) if current is not None and target else None
            if cached is not None:
                info, offset = cached
            else:  # the database path: also judges revocation, unknown targets, unsigned artefacts
                info, offset, device_id = await self.pool.run(self._plan_for, request, credential_from(context))
            chunk = chunk_size(request.max_chunk_bytes, self.settings)
        if info is None or not info.artefact_sha256:
            yield pb.GetUpdateResponse(info=info)
            return
        yield pb.GetUpdateResponse(info=info)
        sent = 0
        finished = False
        try:
            pos = offset
            while pos < info.artefact_size:
                # A download under way is never shed: refusing it now would waste what was sent.
                data = await self.pool.run(self.blobs.read_range, info.artefact_sha256, pos, chunk, shed=False)
                if not data:
                    break
                yield pb.GetUpdateResponse(chunk=pb.Chunk(offset=pos, data=data))
                pos += len(data)
                sent += len(data)
            finished = True
        finally:
            complete = offset + sent >= info.artefact_size
            if finished:  # recorded before the stream ends: the client sees the end after it
                await self.pool.run(self._record_delivery, device_id, info, sent, complete, shed=False)
            else:  # cancelled: record without waiting (nothing awaits a cancelled handler)
                self.pool.submit(self._record_delivery, device_id, info, sent, complete)

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

    # --- WatchUpdates --------------------------------------------------------------------

    async def WatchUpdates(self, request: pb.WatchUpdatesRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchUpdatesResponse]:
        async with domain_errors(context):
            device_id = await self._device_id(context)
            check_hash(request.model_hash, "model_hash")
            release = self.device_streams.open(device_id, f"device {device_id} WatchUpdates")
        try:
            async for msg in self._watch(device_id, request, context):
                yield msg
        finally:
            release()

    async def _watch(self, device_id: str, request: pb.WatchUpdatesRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchUpdatesResponse]:
        limit = float(self.settings.watch_max_seconds)
        if request.max_seconds > 0:
            limit = min(limit, request.max_seconds)
        deadline = time.monotonic() + limit
        stream = self.hub.open(device_id)  # before the read: a publish from here on is pushed
        try:
            async with domain_errors(context):
                current = await self.hub.target(device_id)
                if current is None:
                    raise UnauthenticatedError("device revoked")
            target, info = current
            stream.last_sent = target
            yield pb.WatchUpdatesResponse(target_model_hash=target, keepalive=False,
                                          round_id=info.round_id if info is not None else "")
            keepalive = self.settings.watch_keepalive_s
            while (left := deadline - time.monotonic()) > 0:
                message = await stream.next(min(keepalive, left))
                if message is None:  # the keepalive timer
                    if deadline - time.monotonic() > 0:
                        yield pb.WatchUpdatesResponse(target_model_hash=stream.last_sent or "", keepalive=True)
                elif message == REVOKED:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "device revoked")
                elif message == STOPPING:
                    return
                elif isinstance(message, Target) and message.model_hash != stream.last_sent:
                    stream.last_sent = message.model_hash
                    yield pb.WatchUpdatesResponse(target_model_hash=message.model_hash, keepalive=False,
                                                  round_id=message.round_id)
        finally:
            self.hub.close(stream)  # wakes no one
