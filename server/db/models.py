"""ORM tables. Schemas exposed over REST live in server/api/schemas.py, not here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import expression

from server.db.base import Base, utcnow

HASH = String(64)  # hex SHA-256
LINEAGE = String(96)  # "all", "tag:<tag>", "devices:<16 hex>" (server.domain.lineage)


class Device(Base):
    __tablename__ = "devices"
    # GET /devices pages in registration order (migration 0008).
    __table_args__ = (Index("ix_devices_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    tags: Mapped[list] = mapped_column(default=list)
    hardware: Mapped[dict] = mapped_column(default=dict)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    credential_hash: Mapped[str] = mapped_column(HASH, unique=True)  # SHA-256 of the secret
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    model_hash: Mapped[str] = mapped_column(String(64), default="")  # what it reports running
    target_model_hash: Mapped[str] = mapped_column(String(64), default="")  # what it should run
    active_subnet: Mapped[int] = mapped_column(Integer, default=-1)
    budget: Mapped[dict] = mapped_column(default=dict)
    metrics: Mapped[dict] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(32), default="registered")
    last_error: Mapped[str] = mapped_column(Text, default="")
    samples_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    # The versions the agent rolled back after probation (newest last; domain.devices).
    rollbacks: Mapped[list] = mapped_column(default=list)

    @property
    def update_state(self) -> str:
        """The agent's update lifecycle state: its heartbeat's ``state`` (docs/protocol.md)."""
        return self.state


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("device_id", "sample_id", name="uq_samples_device_sample"),
        Index("ix_samples_label", "label"),
        Index("ix_samples_device_id_label", "device_id", "label"),  # counts per device and label (0008)
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    sample_id: Mapped[str] = mapped_column(HASH)  # SHA-256 of the payload = its blob key
    label: Mapped[int | None] = mapped_column(Integer, default=None)
    shape: Mapped[list] = mapped_column(default=list)
    dtype: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column("metadata", default=dict)
    captured_at: Mapped[datetime | None] = mapped_column(default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artefact(Base):
    """Bytes an agent can download: a full model or a diff (kept in the blob store)."""

    __tablename__ = "artefacts"

    sha256: Mapped[str] = mapped_column(HASH, primary_key=True)
    encoding: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    base_model_hash: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    target_model_hash: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    # GET /models?lineage= pages a lineage newest first (migration 0008).
    __table_args__ = (Index("ix_model_versions_lineage_number", "lineage", "number"),)

    model_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)  # 0, 1, 2... in publish order
    parent_hash: Mapped[str | None] = mapped_column(ForeignKey("model_versions.model_hash"), default=None)
    arch_json: Mapped[str] = mapped_column(Text)
    full_artefact_sha256: Mapped[str] = mapped_column(ForeignKey("artefacts.sha256"))
    round_id: Mapped[str | None] = mapped_column(String(32), default=None)
    method: Mapped[str] = mapped_column(String(32))  # init, full, dpu...
    metrics: Mapped[dict] = mapped_column(default=dict)
    reinit_seed: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # New devices and cohort "all" rounds run the newest fleet-default version.
    fleet_default: Mapped[bool] = mapped_column(Boolean, default=False)
    # The cohort lineage whose round made it; each lineage has its own head.
    lineage: Mapped[str] = mapped_column(LINEAGE, default="all", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


_ACTIVE = text("status IN ('training', 'publishing')")


class Round(Base):
    __tablename__ = "rounds"
    # At most one running round per lineage, enforced by the database: rounds of one lineage
    # build on each other's state and must run in order, whatever the number of workers.
    __table_args__ = (
        Index("uq_rounds_active_lineage", "lineage", unique=True, postgresql_where=_ACTIVE, sqlite_where=_ACTIVE),
        Index("ix_rounds_created_at_id", "created_at", "id"),  # GET /rounds, newest first (0008)
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    method: Mapped[str] = mapped_column(String(32))
    cohort: Mapped[dict] = mapped_column(default=dict)
    params: Mapped[dict] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    base_model_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    model_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    metrics: Mapped[dict] = mapped_column(default=dict)
    device_ids: Mapped[list] = mapped_column(default=list)  # the cohort, resolved at publish
    lineage: Mapped[str] = mapped_column(LINEAGE, default="all")
    data_scope: Mapped[str] = mapped_column(String(16), default="cohort")  # "cohort" | "all"
    # Which worker process runs it, and when that worker last said it was alive.
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Delivery(Base):
    """Bytes streamed to one device for one artefact (summed over resumed downloads)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("device_id", "artefact_sha256", name="uq_deliveries_device_artefact"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    artefact_sha256: Mapped[str] = mapped_column(ForeignKey("artefacts.sha256"))
    target_model_hash: Mapped[str] = mapped_column(String(64), index=True)
    final_model_hash: Mapped[str] = mapped_column(String(64), index=True)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    completed: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PolicyStateRecord(Base):
    """State an update policy carries from one round of a lineage to the next.

    ``meta`` is the JSON half of :meth:`PolicyState.to_record`, ``tensors_sha256`` the blob
    of its tensors (one safetensors file). ``generation`` grows by one at every save, so a
    worker that read generation g can only write g + 1 (optimistic concurrency). A cleared
    state keeps its row (``meta`` null) so the generation never goes back.
    """

    __tablename__ = "policy_states"
    __table_args__ = (UniqueConstraint("lineage", "method", name="uq_policy_states_lineage_method"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(LINEAGE)
    method: Mapped[str] = mapped_column(String(32))
    schema: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    round_id: Mapped[str | None] = mapped_column(String(32), default=None)
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True, default=None)
    tensors_sha256: Mapped[str | None] = mapped_column(HASH, default=None, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- H3: operator API tokens and the audit log (issue 9; migration 0004) --------------------


class OperatorToken(Base):
    """A credential for the operator REST API. Only the SHA-256 of the secret is stored; the
    ``id`` is also the token's visible middle part (``elop_<id>_<secret>``) so a leaked token
    can be named and revoked. ``scope`` is one of read < operate < admin (server.domain.operators)."""

    __tablename__ = "operator_tokens"
    __table_args__ = (Index("ix_operator_tokens_created_at_id", "created_at", "id"),)  # GET /tokens (0008)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEvent(Base):
    """One mutating operator call, written before the handler runs (``status`` null) and
    completed with its outcome afterwards (server.domain.audit)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_token_name", "token_name"),)  # GET /audit?token=<name> (0008)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    token_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    token_name: Mapped[str] = mapped_column(String(64), default="anonymous")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    action: Mapped[str] = mapped_column(String(128), default="", index=True)
    target: Mapped[str] = mapped_column(String(512), default="")
    status: Mapped[int | None] = mapped_column(Integer, default=None)
    detail: Mapped[str] = mapped_column(Text, default="")


# --- H4: managed device enrollment (issue 9; migration 0005) ---------------------------------


class EnrollmentToken(Base):
    """An operator-issued credential agents present to Register. Only the SHA-256 of the
    secret is stored; ``id`` is also the token's visible middle part (``elen_<id>_<secret>``)
    so a leaked token can be named and revoked (server.domain.enrollment)."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(HASH, unique=True)
    tags: Mapped[list] = mapped_column(default=list)  # granted to every device it enrols
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # May re-register a hardware id some other token enrolled (a replaced device's credential
    # is rotated). An ordinary token may re-register only the devices it enrolled itself.
    reenroll: Mapped[bool] = mapped_column(Boolean, default=False, server_default=expression.false())


class Enrollment(Base):
    """A hardware id a token enrolled: registering it again with the same token (a device that
    lost its credential) consumes no further use."""

    __tablename__ = "enrollments"

    token_id: Mapped[str] = mapped_column(ForeignKey("enrollment_tokens.id", ondelete="CASCADE"), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- H6: signed artefacts and signing keys (issue 9; migration 0006) --------------------------


class SigningKey(Base):
    """A public key agents are told to trust (server.signing). The first is pinned by agents at
    enrollment; later ones reach them through a KeyStatementRecord signed by a trusted key.
    A retired key is no longer sent at enrollment nor used to sign."""

    __tablename__ = "signing_keys"

    key_id: Mapped[str] = mapped_column(HASH, primary_key=True)  # hex SHA-256 of public_key
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(default=None)


class KeyStatementRecord(Base):
    """A signed key statement (shared.signing.KeyStatement), sent to agents in publish order."""

    __tablename__ = "key_statements"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(HASH)  # the key announced
    signer_key_id: Mapped[str] = mapped_column(HASH)
    statement: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtefactSignatureRecord(Base):
    """One key's signature of an artefact's statement (shared.signing.ArtefactStatement)."""

    __tablename__ = "artefact_signatures"

    artefact_sha256: Mapped[str] = mapped_column(ForeignKey("artefacts.sha256", ondelete="CASCADE"),
                                                 primary_key=True)
    key_id: Mapped[str] = mapped_column(HASH, primary_key=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceClientCertificate(Base):
    """A client certificate the server's CA issued to a device for mutual TLS (issue 9): the
    mTLS port accepts a peer certificate only if its fingerprint is here, for the device
    whose credential the call presents, unexpired and not revoked (docs/security.md)."""

    __tablename__ = "device_client_certificates"

    fingerprint: Mapped[str] = mapped_column(HASH, primary_key=True)  # SHA-256 of the DER
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    serial: Mapped[str] = mapped_column(String(40))  # hex
    not_after: Mapped[datetime]
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)  # re-registration revokes older ones
