"""Update rounds: queue one, follow it, cancel it while it waits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import ValidationError
from sqlalchemy import update

from server.api.deps import CtxDep, SessionDep, require_scope
from server.api.errors import format_errors, responses
from server.api.pagination import DEFAULT_LIMIT, LimitParam, RoundOffset
from server.api.schemas import (
    MethodPublic,
    MethodsPublic,
    RoundCreate,
    RoundPublic,
    RoundsPublic,
    RoundSummaryPublic,
)
from server.db.base import utcnow
from server.db.models import Round
from server.domain import rounds as R
from server.domain.errors import ConflictError, InvalidArgumentError
from server.training.registry import DEFAULT_METHOD, POLICIES, get_policy

router = APIRouter(prefix="/rounds", tags=["rounds"], responses=responses(401, 422))

RoundId = Annotated[str, Path(max_length=64, description="Round id (from POST or GET /api/v1/rounds).")]
CANCELLED = "cancelled by an operator"


def summary(rnd: Round) -> RoundSummaryPublic:
    return RoundSummaryPublic(
        id=rnd.id, status=rnd.status, reason=rnd.reason, method=rnd.method, cohort=rnd.cohort or {},
        lineage=rnd.lineage, data_scope=rnd.data_scope, params=rnd.params or {}, progress=rnd.progress, progress_message=rnd.progress_message,
        base_model_hash=rnd.base_model_hash, model_hash=rnd.model_hash, metrics=rnd.metrics or {},
        created_at=rnd.created_at, started_at=rnd.started_at, finished_at=rnd.finished_at,
        devices_total=len(rnd.device_ids or []),
    )


@router.post("", status_code=202, response_model=RoundPublic, responses=responses(404, 413), dependencies=[require_scope("operate")])
def create_round(body: RoundCreate, response: Response, session: SessionDep, ctx: CtxDep) -> RoundPublic:
    """Queue a round; a worker trains it on the cohort's samples (``data_scope``), from the
    version the cohort runs, and on success publishes a version of the cohort's lineage.
    Params are checked now (so a typo fails here, not in the worker) and stored resolved.
    Unknown device ids in the cohort are a 404."""
    policy = get_policy(body.method)
    try:
        params = policy.parse_params(body.params)
    except ValidationError as exc:
        raise InvalidArgumentError(f"invalid params for method {body.method!r}: {format_errors(exc.errors())}") from None
    rnd = R.create_round(session, method=body.method, cohort=body.cohort.model_dump(), params=params.model_dump(mode="json"),
                         data_scope=body.data_scope)
    session.commit()
    ctx.rounds_wakeup.notify({"round_id": rnd.id})
    response.headers["Location"] = f"/api/v1/rounds/{rnd.id}"
    return RoundPublic.model_validate(R.round_report(session, rnd))


@router.get("/methods", response_model=MethodsPublic, dependencies=[require_scope("read")])
def list_methods() -> MethodsPublic:
    """Update policies a round can use, with the JSON schema of their params."""
    data = [
        MethodPublic(name=name, default=name == DEFAULT_METHOD, params_schema=p.Params.model_json_schema())
        for name, p in sorted(POLICIES.items())
    ]
    return MethodsPublic(data=data, count=len(data))


@router.get("", response_model=RoundsPublic, dependencies=[require_scope("read")])
def list_rounds(
    session: SessionDep,
    offset: RoundOffset = 0,
    limit: LimitParam = DEFAULT_LIMIT,
) -> RoundsPublic:
    """Rounds, newest first (without the per-device figures; GET one round for those)."""
    return RoundsPublic(data=[summary(r) for r in R.list_rounds(session, offset=offset, limit=limit)],
                        count=R.count_rounds(session))


@router.get("/{round_id}", response_model=RoundPublic, responses=responses(404), dependencies=[require_scope("read")])
def get_round(round_id: RoundId, session: SessionDep) -> RoundPublic:
    """Status, progress, reason, metrics, and per-device bytes sent / devices on the new version."""
    return RoundPublic.model_validate(R.round_report(session, R.get_round(session, round_id)))


@router.post("/{round_id}/cancel", response_model=RoundPublic, responses=responses(404, 409), dependencies=[require_scope("operate")])
def cancel_round(round_id: RoundId, session: SessionDep) -> RoundPublic:
    """Fail a round that is still queued. A running round cannot be cancelled (409)."""
    rnd = R.get_round(session, round_id)
    # Conditional update: the worker may claim the round between our read and this write.
    res = session.execute(
        update(Round).where(Round.id == round_id, Round.status == R.QUEUED)
        .values(status=R.FAILED, reason=CANCELLED, finished_at=utcnow())
    )
    if res.rowcount != 1:
        session.rollback()
        session.refresh(rnd)
        raise ConflictError(f"round {round_id} is {rnd.status}; only queued rounds can be cancelled")
    session.commit()
    session.refresh(rnd)
    return RoundPublic.model_validate(R.round_report(session, rnd))
