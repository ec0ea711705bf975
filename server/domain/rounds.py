"""Update rounds: a job with a state machine, created over REST and run by the worker.

    queued -> training -> publishing -> done
                   \\-> skipped (nothing better to ship)    any -> failed (with a reason)
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timezone

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from server.db.base import utcnow
from server.db.models import Delivery, Device, Round
from server.domain import queries as Q
from server.domain.devices import COHORT_ID_CHUNK, check_cohort
from server.domain.errors import ConflictError, NotFoundError
from server.domain.lineage import lineage_key, validate_cohort, validate_data_scope

QUEUED, TRAINING, PUBLISHING, DONE, SKIPPED, FAILED = "queued", "training", "publishing", "done", "skipped", "failed"
TERMINAL = frozenset({DONE, SKIPPED, FAILED})
ACTIVE = (TRAINING, PUBLISHING)  # at most one per lineage (index uq_rounds_active_lineage)
# The whole transition table in one place; anything else is a bug.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({TRAINING, FAILED}),
    TRAINING: frozenset({PUBLISHING, SKIPPED, FAILED}),
    PUBLISHING: frozenset({DONE, FAILED}),
    DONE: frozenset(),
    SKIPPED: frozenset(),
    FAILED: frozenset(),
}


def create_round(session: Session, *, method: str, cohort: dict, params: dict, data_scope: str = "cohort") -> Round:
    cohort = validate_cohort(cohort)
    check_cohort(session, cohort)  # unknown device ids fail now, not in the worker (a COUNT: no rows read)
    rnd = Round(id=uuid.uuid4().hex, status=QUEUED, method=method, cohort=cohort, params=params,
                lineage=lineage_key(cohort), data_scope=validate_data_scope(data_scope))
    session.add(rnd)
    session.flush()
    return rnd


def get_round(session: Session, round_id: str, *, for_update: bool = False) -> Round:
    """``for_update``: lock the row until the transaction ends (PostgreSQL), so a worker's
    final write and another worker failing the round as interrupted cannot interleave."""
    rnd = session.get(Round, round_id, with_for_update=for_update or None, populate_existing=for_update)
    if rnd is None:
        raise NotFoundError(f"round {round_id!r} not found")
    return rnd


def list_rounds(session: Session, *, offset: int = 0, limit: int = 100) -> list[Round]:
    """One page of rounds, newest first (index ix_rounds_created_at_id; the id breaks ties so
    pages never overlap)."""
    return Q.page(session, select(Round).order_by(Round.created_at.desc(), Round.id.desc()), offset=offset, limit=limit)


def count_rounds(session: Session) -> int:
    return Q.count(session, Round)


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


def claim_next(session: Session, *, worker_id: str = "") -> str | None:
    """Move the next claimable round to training for ``worker_id``; None if there is none.

    Claimable: the oldest queued round of its lineage, while no round of that lineage runs
    (rounds of one lineage build on each other's model and state, so they run in order;
    different lineages run side by side). With several workers on PostgreSQL, FOR UPDATE SKIP
    LOCKED hands each worker a different candidate without waiting; if two claim the same
    lineage at once, the unique index on running rounds (uq_rounds_active_lineage) makes the
    later UPDATE raise IntegrityError, which the caller treats as "lost the race, look again".
    SQLite has one writer; the conditional UPDATE and the same index cover it.
    """
    running, older = aliased(Round), aliased(Round)
    candidate = session.scalars(
        select(Round.id)
        .where(
            Round.status == QUEUED,
            ~exists().where(running.lineage == Round.lineage, running.status.in_(ACTIVE)),
            ~exists().where(
                older.lineage == Round.lineage, older.status == QUEUED,
                or_(older.created_at < Round.created_at,
                    and_(older.created_at == Round.created_at, older.id < Round.id)),
            ),
        )
        .order_by(Round.created_at, Round.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if candidate is None:
        return None
    now = utcnow()
    res = session.execute(
        update(Round)
        .where(Round.id == candidate, Round.status == QUEUED)
        .values(status=TRAINING, started_at=now, worker_id=worker_id, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return candidate if res.rowcount == 1 else None


# --- which worker runs a round, and whether it is still there --------------------------------

_LIVE_WORKERS: set[str] = set()  # ids of the workers running in this process


def new_worker_id() -> str:
    """``host:pid:nonce``; the nonce tells this run of a process from an earlier one."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def set_worker_live(worker_id: str, live: bool) -> None:
    (_LIVE_WORKERS.add if live else _LIVE_WORKERS.discard)(worker_id)


def heartbeat(session: Session, round_id: str, worker_id: str, *, status: str | None = None) -> bool:
    """Say the worker is still running the round (in ``status``, if given); False if the round
    is no longer its own. A write, so it also holds the round until the transaction ends: the
    row lock on PostgreSQL, the database's write lock on SQLite (where FOR UPDATE is a no-op),
    and no reaper can fail the round between this check and the caller's commit."""
    res = session.execute(
        update(Round).where(Round.id == round_id, Round.worker_id == worker_id,
                            Round.status.in_(ACTIVE) if status is None else Round.status == status)
        .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _worker_gone(worker_id: str) -> bool:
    """Known dead: claimed by no recorded worker, or by a process of this host that has
    exited (or, with this very pid, by an earlier run of it). Workers on other hosts are
    judged by their heartbeat alone."""
    if not worker_id:
        return True
    host, _, rest = worker_id.partition(":")
    pid, _, _nonce = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return worker_id not in _LIVE_WORKERS
    return not _pid_alive(int(pid))


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t  # SQLite returns naive UTC


def fail_interrupted(session: Session, *, stale_after_s: float | None = None) -> int:
    """Fail running rounds whose worker is gone (see ``_worker_gone``) or has not sent a
    heartbeat for ``stale_after_s`` seconds; rounds of live workers are left alone. Run at
    start-up and periodically by every worker, so a crashed worker's lineage is unblocked."""
    now = utcnow()
    n = 0
    for rid, wid, beat in session.execute(
        select(Round.id, Round.worker_id, Round.heartbeat_at).where(Round.status.in_(ACTIVE))
    ).all():
        owned = [Round.id == rid, Round.worker_id == wid, Round.status.in_(ACTIVE)]
        if _worker_gone(wid):
            why = "has exited"
        elif stale_after_s is not None and (beat is None or (now - _aware(beat)).total_seconds() > stale_after_s):
            why = f"sent no heartbeat for {stale_after_s:g} s"
            # ...and still none: a beat landing after the read above keeps the round alive.
            owned.append(Round.heartbeat_at.is_(None) if beat is None else Round.heartbeat_at == beat)
        else:
            continue
        res = session.execute(
            update(Round).where(*owned)
            .values(status=FAILED, finished_at=now,
                    reason=f"interrupted: the worker running the round {why} ({wid or 'unknown worker'})")
            .execution_options(synchronize_session=False)
        )
        n += res.rowcount
    return n


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


PROBATION_STATE = "probation"  # the agent's update state while a new version is judged


def round_report(session: Session, rnd: Round) -> dict:
    """Status plus delivery figures: bytes sent per device, devices on the new version, and
    devices that rolled it back."""
    report: dict = {
        "id": rnd.id, "status": rnd.status, "reason": rnd.reason, "method": rnd.method,
        "cohort": rnd.cohort, "lineage": rnd.lineage, "data_scope": rnd.data_scope, "params": rnd.params, "progress": rnd.progress,
        "progress_message": rnd.progress_message, "base_model_hash": rnd.base_model_hash,
        "model_hash": rnd.model_hash, "metrics": rnd.metrics, "created_at": _iso(rnd.created_at),
        "started_at": _iso(rnd.started_at), "finished_at": _iso(rnd.finished_at),
        "devices": [], "devices_total": len(rnd.device_ids or []), "devices_on_version": 0,
        "devices_on_probation": 0, "rollbacks": [],
    }
    if not rnd.model_hash or not rnd.device_ids:
        return report
    sent: dict[str, int] = {}
    for d in session.scalars(select(Delivery).where(Delivery.final_model_hash == rnd.model_hash)):
        sent[d.device_id] = sent.get(d.device_id, 0) + d.bytes_sent
    ids = list(rnd.device_ids)
    devices = {d.id: d for i in range(0, len(ids), COHORT_ID_CHUNK)  # a cohort may exceed a driver's parameter limit
               for d in session.scalars(select(Device).where(Device.id.in_(ids[i : i + COHORT_ID_CHUNK])))}
    for device_id in rnd.device_ids:
        dev = devices.get(device_id)
        runs_it = bool(dev and dev.model_hash == rnd.model_hash)
        # A device on probation serves the version but may still roll it back: not counted
        # as on the version until it commits (docs/protocol.md#update-lifecycle).
        on_probation = runs_it and dev is not None and dev.state == PROBATION_STATE
        on_version = runs_it and not on_probation
        report["devices_on_version"] += int(on_version)
        report["devices_on_probation"] += int(on_probation)
        report["devices"].append(
            {"device_id": device_id, "bytes_sent": sent.get(device_id, 0), "on_version": on_version,
             "model_hash": dev.model_hash if dev else "", "state": dev.state if dev else "unknown"}
        )
        # The device's probation refused this round's version (docs/protocol.md#update-lifecycle).
        for r in (dev.rollbacks or []) if dev else []:
            if r.get("model_hash") == rnd.model_hash:
                report["rollbacks"].append({"device_id": device_id, "reason": r.get("reason", ""),
                                            "at_ms": int(r.get("at_ms", 0))})
    return report
