"""Enrollment tokens agents present to Register: create (the secret is shown once), list,
revoke. Admin only (docs/security.md "Device enrollment")."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response
from pydantic import Field

from server.api.deps import SessionDep, require_scope
from server.api.errors import responses
from server.api.schemas import BodyIn, BodyOut, TagStr, UtcDatetime
from server.db.models import EnrollmentToken
from server.domain import enrollment as E
from server.domain.devices import MAX_TAGS

router = APIRouter(prefix="/enrollment-tokens", tags=["enrollment"], responses=responses(401, 403, 422))

EnrollmentTokenId = Annotated[str, Path(max_length=32, description="Token id (from GET /api/v1/enrollment-tokens).")]


class EnrollmentTokenCreate(BodyIn):
    name: str = Field(min_length=1, max_length=64, description="What the token is for, e.g. 'site-a batch 3'.")
    tags: list[TagStr] = Field(default_factory=list, max_length=MAX_TAGS,
                               description="Tags every device it enrols gets (on top of those the agent asks for).")
    max_uses: int = Field(E.DEFAULT_MAX_USES, ge=1, le=E.MAX_USES_LIMIT,
                          description="Devices it may enrol; re-registering a device it enrolled uses none.")
    expires_in_s: int = Field(int(E.DEFAULT_TTL.total_seconds()), ge=int(E.MIN_TTL.total_seconds()),
                              le=int(E.MAX_TTL.total_seconds()),
                              description="Seconds until it expires (default 24 h, at most 366 days).")
    reenroll: bool = Field(False, description="Whether it may also re-register devices another token enrolled "
                                              "(rotating their credential), e.g. to replace a device's storage. "
                                              "Without it a token re-registers only the devices it enrolled.")


class EnrollmentTokenPublic(BodyOut):
    id: str = Field(description="Public id; also the middle part of the token (elen_<id>_<secret>).")
    name: str = Field(description="What the token is for.")
    tags: list[str] = Field(description="Granted to every device it enrols.")
    max_uses: int = Field(description="Devices it may enrol.")
    uses: int = Field(description="Devices enrolled so far.")
    created_at: UtcDatetime = Field(description="When it was created (UTC).")
    expires_at: UtcDatetime = Field(description="When Register stops accepting it (UTC).")
    revoked_at: UtcDatetime | None = Field(description="When it was revoked (UTC); null if never.")
    reenroll: bool = Field(description="Whether it may re-register devices another token enrolled.")
    status: Literal["active", "expired", "revoked", "used_up"] = Field(description="Whether Register accepts it now.")


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str = Field(description="The secret agents present (EDGELOOP_AGENT_ENROLLMENT_TOKEN). Shown only here.")


class EnrollmentTokensPublic(BodyOut):
    data: list[EnrollmentTokenPublic] = Field(description="Every enrollment token, oldest first.")
    count: int = Field(description="Number of tokens in data.")


def token_public(row: EnrollmentToken) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic(
        id=row.id, name=row.name, tags=list(row.tags or []), max_uses=row.max_uses, uses=row.uses,
        created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
        reenroll=bool(row.reenroll),
        status=E.status(row),  # type: ignore[arg-type]
    )


@router.post("", status_code=201, response_model=EnrollmentTokenCreated, responses=responses(413),
             dependencies=[require_scope("admin")])
def create_enrollment_token(body: EnrollmentTokenCreate, response: Response, session: SessionDep) -> EnrollmentTokenCreated:
    """Create a token. The response carries the secret ``token``; it is never shown again."""
    issued = E.create_token(session, name=body.name, tags=body.tags, max_uses=body.max_uses,
                            expires_in=timedelta(seconds=body.expires_in_s), reenroll=body.reenroll)
    session.commit()
    response.headers["Location"] = f"/api/v1/enrollment-tokens/{issued.token.id}"
    return EnrollmentTokenCreated(**token_public(issued.token).model_dump(), token=issued.secret)


@router.get("", response_model=EnrollmentTokensPublic, dependencies=[require_scope("admin")])
def list_enrollment_tokens(session: SessionDep) -> EnrollmentTokensPublic:
    """Every enrollment token (expired, used-up and revoked ones included; never a secret)."""
    rows = E.list_tokens(session)
    return EnrollmentTokensPublic(data=[token_public(r) for r in rows], count=len(rows))


@router.delete("/{token_id}", response_model=EnrollmentTokenPublic, responses=responses(404),
               dependencies=[require_scope("admin")])
def revoke_enrollment_token(token_id: EnrollmentTokenId, session: SessionDep) -> EnrollmentTokenPublic:
    """Revoke a token: Register refuses it from now on (idempotent; the row is kept). Devices
    it enrolled keep their credentials; revoke those under /devices."""
    row = E.revoke_token(session, token_id)
    session.commit()
    return token_public(row)
