"""Model versions and their artefacts (full models and diffs)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.api.deps import CtxDep, SessionDep, require_scope
from server.api.errors import responses
from server.api.pagination import DEFAULT_LIMIT, LimitParam, VersionOffset
from server.api.schemas import (
    ArtefactPublic,
    ArtefactsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
)
from server.db.models import Artefact, ModelVersion
from server.domain.errors import NotFoundError
from server.domain.versions import get_version, latest_version

router = APIRouter(prefix="/models", tags=["models"], responses=responses(401, 422))

ModelRef = Annotated[
    str,
    Path(
        max_length=64,
        description="A model hash (64 hex characters), a version number such as '3', or 'latest'.",
    ),
]


def resolve_version(session: Session, ref: str) -> ModelVersion:
    if ref == "latest":
        mv = latest_version(session)
        if mv is None:
            raise NotFoundError("no model version has been published")
        return mv
    # ASCII digits only: str.isdigit() also takes '⁸', which int() refuses (a 500). A hash is
    # 64 characters, so a number of at most 9 digits is never one.
    if ref.isascii() and ref.isdigit() and len(ref) <= 9:
        mv = session.scalars(select(ModelVersion).where(ModelVersion.number == int(ref))).first()
        if mv is None:
            raise NotFoundError(f"model version number {ref} not found")
        return mv
    return get_version(session, ref)


def _public(mv: ModelVersion, full: Artefact | None) -> ModelVersionPublic:
    return ModelVersionPublic(
        number=mv.number, model_hash=mv.model_hash, parent_hash=mv.parent_hash, method=mv.method,
        metrics=mv.metrics or {}, created_at=mv.created_at, round_id=mv.round_id,
        fleet_default=mv.fleet_default, lineage=mv.lineage, reinit_seed=mv.reinit_seed,
        full_artefact_sha256=mv.full_artefact_sha256, full_artefact_size=full.size if full else 0,
        arch=json.loads(mv.arch_json),
    )


def _artefact_public(a: Artefact) -> ArtefactPublic:
    return ArtefactPublic(
        sha256=a.sha256, kind="diff" if a.base_model_hash else "full", encoding=a.encoding, size=a.size,
        base_model_hash=a.base_model_hash, target_model_hash=a.target_model_hash, created_at=a.created_at,
    )


@router.get("", response_model=ModelVersionsPublic, dependencies=[require_scope("read")])
def list_models(
    session: SessionDep,
    offset: VersionOffset = 0,
    limit: LimitParam = DEFAULT_LIMIT,
    lineage: Annotated[str | None, Query(max_length=96, description="Only this lineage's versions, e.g. 'tag:site-a'.")] = None,
) -> ModelVersionsPublic:
    """Published model versions, newest first (each cohort lineage is a head of its own)."""
    where = [ModelVersion.lineage == lineage] if lineage is not None else []
    count = session.scalar(select(func.count()).select_from(ModelVersion).where(*where)) or 0
    rows = session.execute(
        select(ModelVersion, Artefact)
        .join(Artefact, Artefact.sha256 == ModelVersion.full_artefact_sha256, isouter=True)
        .where(*where).order_by(ModelVersion.number.desc()).offset(offset).limit(limit)
    ).all()
    return ModelVersionsPublic(data=[_public(mv, art) for mv, art in rows], count=count)


@router.get("/{model_ref}", response_model=ModelVersionPublic, responses=responses(404), dependencies=[require_scope("read")])
def get_model(model_ref: ModelRef, session: SessionDep) -> ModelVersionPublic:
    """One version by hash, number or 'latest'."""
    mv = resolve_version(session, model_ref)
    return _public(mv, session.get(Artefact, mv.full_artefact_sha256))


@router.get(
    "/{model_ref}/download",
    response_class=FileResponse,
    dependencies=[require_scope("read")],
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The full-model artefact bytes."},
        **responses(404),
    },
)
def download_model(model_ref: ModelRef, session: SessionDep, ctx: CtxDep) -> FileResponse:
    """The full-model artefact (safetensors with EdgeLoop metadata), streamed from disk.
    ``X-Edgeloop-Artefact-Sha256`` lets the client verify what it received; Range requests work."""
    mv = resolve_version(session, model_ref)
    sha = mv.full_artefact_sha256
    path = ctx.blobs.path(sha)
    if not path.is_file():
        raise NotFoundError(f"artefact {sha[:16]}... of model {mv.model_hash[:16]}... is missing from the blob store")
    return FileResponse(
        path, media_type="application/octet-stream",
        filename=f"edgeloop-model-v{mv.number}-{mv.model_hash[:12]}.safetensors",
        headers={"X-Edgeloop-Artefact-Sha256": sha, "X-Edgeloop-Model-Hash": mv.model_hash},
    )


@router.get("/{model_ref}/artefacts", response_model=ArtefactsPublic, responses=responses(404), dependencies=[require_scope("read")])
def list_artefacts(model_ref: ModelRef, session: SessionDep) -> ArtefactsPublic:
    """Every artefact that produces this version: its full model and diffs from older ones."""
    mv = resolve_version(session, model_ref)
    arts = list(session.scalars(select(Artefact).where(Artefact.target_model_hash == mv.model_hash)))
    arts.sort(key=lambda a: (a.base_model_hash is not None, a.size, a.sha256))
    return ArtefactsPublic(data=[_artefact_public(a) for a in arts], count=len(arts))


@router.get(
    "/{model_ref}/artefacts/{sha256}/download",
    response_class=FileResponse,
    dependencies=[require_scope("read")],
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The artefact bytes."},
        **responses(404),
    },
)
def download_artefact(
    model_ref: ModelRef,
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="Artefact SHA-256 (from .../artefacts).")],
    session: SessionDep,
    ctx: CtxDep,
) -> FileResponse:
    """Any artefact of this version (e.g. a diff), with the same headers as /download."""
    mv = resolve_version(session, model_ref)
    art = session.get(Artefact, sha256)
    if art is None or art.target_model_hash != mv.model_hash:
        raise NotFoundError(f"artefact {sha256[:16]}... of model {mv.model_hash[:16]}... not found")
    path = ctx.blobs.path(sha256)
    if not path.is_file():
        raise NotFoundError(f"artefact {sha256[:16]}... is missing from the blob store")
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"edgeloop-artefact-{sha256[:12]}.bin",
        headers={"X-Edgeloop-Artefact-Sha256": sha256, "X-Edgeloop-Model-Hash": mv.model_hash,
                 "X-Edgeloop-Artefact-Encoding": art.encoding},
    )
