"""Artefact signing: the keys agents trust, and off-server signing (signing_mode=external): the
statements a key holder signs, and the signatures it uploads (docs/security.md#signed-artefacts)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from server import signing
from server.api.deps import CtxDep, SessionDep, require_scope
from server.api.errors import responses
from server.api.schemas import UtcDatetime
from server.db.models import SigningKey

router = APIRouter(tags=["signing"], responses=responses(401, 422))
HEX64 = r"^[0-9a-f]{64}$"


class SigningKeyPublic(BaseModel):
    key_id: str = Field(description="Hex SHA-256 of the raw public key.")
    public_key: str = Field(description="The raw 32-byte Ed25519 public key, hex.")
    created_at: UtcDatetime = Field(description="When the server first trusted it (UTC).")
    retired_at: UtcDatetime | None = Field(description="Set once retired: no longer sent to agents at enrollment (UTC).")


class SigningKeysPublic(BaseModel):
    mode: str = Field(description="'local' (the server signs) or 'external' (a key holder signs).")
    data: list[SigningKeyPublic] = Field(description="Every key the server has trusted, oldest first.")
    count: int = Field(description="Number of keys in `data`.")


class StatementPublic(BaseModel):
    artefact_sha256: str = Field(description="SHA-256 (hex) of the artefact bytes.")
    encoding: str = Field(description="The artefact's encoding, e.g. model/safetensors-v1.")
    size: int = Field(description="Artefact size in bytes.")
    target_model_hash: str = Field(description="Model hash (v2) the artefact produces.")
    base_model_hash: str | None = Field(description="Model hash a diff applies to; null for full models and seeds.")


class StatementsPublic(BaseModel):
    data: list[StatementPublic] = Field(description="Artefacts no trusted key has signed yet: what `edgeloop sign` signs.")
    count: int = Field(description="Number of statements in `data`.")


class SignatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(pattern=HEX64, description="The signing key's id (a trusted key of this server).")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="The 64-byte Ed25519 signature, hex.")


class SignaturePublic(BaseModel):
    artefact_sha256: str = Field(description="SHA-256 (hex) of the signed artefact.")
    key_id: str = Field(description="Id of the key that made the signature.")
    created_at: UtcDatetime = Field(description="When the signature was stored (UTC).")


@router.get("/signing/keys", response_model=SigningKeysPublic, dependencies=[require_scope("read")])
def list_signing_keys(session: SessionDep, ctx: CtxDep) -> SigningKeysPublic:
    """Every signing key the server has trusted, oldest first (pin these on agents with
    ``trusted_keys_file`` instead of at enrollment, if you prefer)."""
    rows = list(session.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.key_id)))
    return SigningKeysPublic(mode=ctx.settings.signing_mode, count=len(rows), data=[
        SigningKeyPublic(key_id=r.key_id, public_key=bytes(r.public_key).hex(), created_at=r.created_at,
                         retired_at=r.retired_at) for r in rows])


@router.get("/artefacts/unsigned", response_model=StatementsPublic, dependencies=[require_scope("read")])
def list_unsigned(
    session: SessionDep,
    key_id: Annotated[str | None, Query(pattern=HEX64, description="Instead: the artefacts this key has not "
                                        "signed (to countersign with a new key after a rotation).")] = None,
) -> StatementsPublic:
    """Statements of the artefacts agents cannot be offered yet (external signing)."""
    rows = signing.unsigned_statements(session, key_id)
    return StatementsPublic(data=[StatementPublic(**r) for r in rows], count=len(rows))


@router.put(
    "/artefacts/{sha256}/signature",
    response_model=SignaturePublic,
    responses=responses(404),
    dependencies=[require_scope("admin")],
)
def put_signature(
    sha256: Annotated[str, Path(pattern=HEX64, description="The artefact's SHA-256.")],
    body: SignatureIn,
    session: SessionDep,
) -> SignaturePublic:
    """Store a key holder's signature of an artefact's statement. Refused (422) unless it
    verifies under a trusted, non-retired key; idempotent."""
    row = signing.add_signature(session, sha256, body.key_id, bytes.fromhex(body.signature))
    session.commit()
    return SignaturePublic(artefact_sha256=row.artefact_sha256, key_id=row.key_id, created_at=row.created_at)


class KeyStatementIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    statement: str = Field(max_length=4096, description="The key statement's canonical JSON, as `edgeloop sign "
                           "rotate|retire` prints it.")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="Its 64-byte Ed25519 signature, hex.")


class KeyStatementPublic(BaseModel):
    id: int = Field(description="Position in the sequence agents receive.")
    key_id: str = Field(description="The key the statement announces (trusted from now on).")
    signer_key_id: str = Field(description="The trusted key that signed it.")
    created_at: UtcDatetime = Field(description="When it was stored (UTC).")


@router.post(
    "/signing/statements",
    response_model=KeyStatementPublic,
    responses=responses(409),
    dependencies=[require_scope("admin")],
)
def post_key_statement(body: KeyStatementIn, session: SessionDep, ctx: CtxDep) -> KeyStatementPublic:
    """Rotation and retirement of an external key holder's key (signing_mode=external): store a
    key statement signed by a trusted key; agents receive it with every update. Refused (422)
    unless it verifies; 409 in local mode; idempotent."""
    row = signing.add_key_statement(ctx.settings, session, body.statement.encode(), bytes.fromhex(body.signature))
    session.commit()
    return KeyStatementPublic(id=row.id, key_id=row.key_id, signer_key_id=row.signer_key_id,
                              created_at=row.created_at)
