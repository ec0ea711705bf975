"""Update rounds: a job with a state machine, created over REST and run by the worker.

    queued -> training -> publishing -> done
                   \\-> skipped (nothing better to ship)    any -> failed (with a reason)
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.db.base import utcnow
from server.db.models import Delivery, Device, Round
from server.domain.devices import resolve_cohort
from server.domain.errors import ConflictError, InvalidArgumentError, NotFoundError

QUEUED, TRAINING, PUBLISHING, DONE, SKIPPED, FAILED = "queued", "training", "publishing", "done", "skipped", "failed"
TERMINAL = frozenset({DONE, SKIPPED, FAILED})
# The whole transition table in one place; anything else is a bug.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({TRAINING, FAILED}),
    TRAINING: frozenset({PUBLISHING, SKIPPED, FAILED}),
    PUBLISHING: frozenset({DONE, FAILED}),
    DONE: frozenset(),
    SKIPPED: frozenset(),
    FAILED: frozenset(),
}


def validate_cohort(cohort: dict) -> dict:
    keys = set(cohort)
    if keys == {"all"} and cohort["all"] is True:
        return {"all": True}
    if keys == {"device_ids"} and isinstance(cohort["device_ids"], list) and cohort["device_ids"]:
        if not all(isinstance(d, str) for d in cohort["device_ids"]) or len(cohort["device_ids"]) > 10_000:
            raise InvalidArgumentError("cohort.device_ids must be a list of up to 10000 device id strings")
        return {"device_ids": sorted(set(cohort["device_ids"]))}
    if keys == {"tag"} and isinstance(cohort["tag"], str) and cohort["tag"]:
        return {"tag": cohort["tag"]}
    raise InvalidArgumentError("cohort must be {'all': true}, {'device_ids': [...]} or {'tag': '...'}")


def create_round(session: Session, *, method: str, cohort: dict, params: dict) -> Round:
    cohort = validate_cohort(cohort)
    resolve_cohort(session, cohort)  # unknown device ids fail now, not in the worker
    rnd = Round(id=uuid.uuid4().hex, status=QUEUED, method=method, cohort=cohort, params=params)
    session.add(rnd)
    session.flush()
    return rnd


def get_round(session: Session, round_id: str) -> Round:
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise NotFoundError(f"round {round_id!r} not found")
    return rnd


def list_rounds(session: Session, *, offset: int = 0, limit: int = 100) -> list[Round]:
    return list(session.scalars(select(Round).order_by(Round.created_at.desc()).offset(offset).limit(limit)))


def transition(session: Session, rnd: Round, status: str, *, reason: str = "") -> Round:
    if status not in TRANSITIONS[rnd.status]:
        raise ConflictError(f"round {rnd.id}: cannot go from {rnd.status} to {status}")
    rnd.status = status
    if reason:
        rnd.reason = reason
    now = utcnow()
    if status == TRAINING:
        rnd.started_at = now
    if status in TERMINAL:
        rnd.finished_at = now
        if status != FAILED:
            rnd.progress = 1.0
    return rnd


def claim_next(session: Session) -> str | None:
    """Atomically move the oldest queued round to training; safe with several workers."""
    candidate = session.scalars(select(Round.id).where(Round.status == QUEUED).order_by(Round.created_at)).first()
    if candidate is None:
        return None
    res = session.execute(
        update(Round)
        .where(Round.id == candidate, Round.status == QUEUED)
        .values(status=TRAINING, started_at=utcnow())
    )
    return candidate if res.rowcount == 1 else None


def fail_interrupted(session: Session) -> int:
    """At start-up: rounds a crashed server left mid-flight are failed, not silently resumed."""
    n = 0
    for rnd in session.scalars(select(Round).where(Round.status.in_([TRAINING, PUBLISHING]))):
        transition(session, rnd, FAILED, reason="interrupted: the server stopped while the round was running")
        n += 1
    return n


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def round_report(session: Session, rnd: Round) -> dict:
    """Status plus delivery figures: bytes sent per device and devices on the new version."""
    report: dict = {
        "id": rnd.id, "status": rnd.status, "reason": rnd.reason, "method": rnd.method,
        "cohort": rnd.cohort, "params": rnd.params, "progress": rnd.progress,
        "progress_message": rnd.progress_message, "base_model_hash": rnd.base_model_hash,
        "model_hash": rnd.model_hash, "metrics": rnd.metrics, "created_at": _iso(rnd.created_at),
        "started_at": _iso(rnd.started_at), "finished_at": _iso(rnd.finished_at),
        "devices": [], "devices_total": len(rnd.device_ids or []), "devices_on_version": 0,
    }
    if not rnd.model_hash or not rnd.device_ids:
        return report
    sent: dict[str, int] = {}
    for d in session.scalars(select(Delivery).where(Delivery.final_model_hash == rnd.model_hash)):
        sent[d.device_id] = sent.get(d.device_id, 0) + d.bytes_sent
    devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(rnd.device_ids)))}
    for device_id in rnd.device_ids:
        dev = devices.get(device_id)
        on_version = bool(dev and dev.model_hash == rnd.model_hash)
        report["devices_on_version"] += int(on_version)
        report["devices"].append(
            {"device_id": device_id, "bytes_sent": sent.get(device_id, 0), "on_version": on_version,
             "model_hash": dev.model_hash if dev else "", "state": dev.state if dev else "unknown"}
        )
    return report
