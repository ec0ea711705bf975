"""Device identity, authentication, heartbeats and cohorts."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from server.db.base import utcnow
from server.db.models import Device, ModelVersion
from server.domain import queries as Q
from server.domain.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError

TAG = re.compile(r"^[a-z0-9._-]{1,64}$")
MAX_TAGS = 32
MAX_HARDWARE_FACTS = 64
MAX_METRICS = 128
MAX_ROLLBACK_REPORTS = 64  # per heartbeat (the agent sends at most 16)
MAX_ROLLBACKS_KEPT = 32  # per device, newest kept


def credential_hash(credential: str) -> str:
    """Only the hash of a device credential is stored; the secret exists on the device only."""
    return hashlib.sha256(credential.encode("utf-8")).hexdigest()


def validate_tags(tags: list[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        raise InvalidArgumentError(f"at most {MAX_TAGS} tags, got {len(tags)}")
    bad = [t for t in tags if not TAG.fullmatch(t)]
    if bad:
        raise InvalidArgumentError(f"tags must match {TAG.pattern}: {bad[:3]}")
    return sorted(set(tags))


def _clip(value: str, limit: int, field: str) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is longer than {limit} characters")
    return value


def default_model_hash(session: Session) -> str:
    """The version a newly registered device should run: the newest fleet default."""
    mv = session.scalars(
        select(ModelVersion).where(ModelVersion.fleet_default.is_(True)).order_by(ModelVersion.number.desc())
    ).first()
    return mv.model_hash if mv else ""


@dataclass(frozen=True)
class Registration:
    device: Device
    credential: str


def register_device(
    session: Session,
    *,
    hardware_id: str,
    name: str = "",
    tags: list[str] | None = None,
    hardware: dict[str, str] | None = None,
    agent_version: str = "",
) -> Registration:
    """Create a device, or re-issue the credential of the device with this ``hardware_id``.
    The caller has checked the right to enrol: Register goes through
    :func:`server.domain.enrollment.register`, which checks the token (and, for a hardware id
    already enrolled, that the token may re-register it) and consumes a use."""
    hardware_id = hardware_id.strip()
    if not hardware_id or len(hardware_id) > 128:
        raise InvalidArgumentError("hardware_id must be 1 to 128 characters")
    hardware = dict(hardware or {})
    if len(hardware) > MAX_HARDWARE_FACTS or any(len(k) > 64 or len(v) > 256 for k, v in hardware.items()):
        raise InvalidArgumentError(f"hardware: at most {MAX_HARDWARE_FACTS} facts, keys <= 64, values <= 256 chars")
    tags = validate_tags(list(tags or []))
    credential = secrets.token_urlsafe(32)
    device = session.scalars(select(Device).where(Device.hardware_id == hardware_id)).first()
    if device is not None and device.revoked:
        # Revocation sticks: a stolen enrollment token must not bring a revoked device back.
        raise UnauthenticatedError(f"device {device.id} is revoked; an operator must restore it first")
    if device is None:
        device = Device(id=uuid.uuid4().hex, hardware_id=hardware_id, target_model_hash=default_model_hash(session))
        session.add(device)
    device.name = _clip(name or device.name or hardware_id, 128, "name")
    device.tags = sorted(set(device.tags or []) | set(tags))
    device.hardware = hardware
    device.agent_version = _clip(agent_version, 64, "agent_version")
    device.credential_hash = credential_hash(credential)  # invalidates any previous credential
    device.last_seen_at = utcnow()
    session.flush()
    return Registration(device, credential)


def authenticate(session: Session, credential: str) -> Device:
    if not credential:
        raise UnauthenticatedError("missing device credential (metadata 'authorization: Bearer <credential>')")
    device = session.scalars(select(Device).where(Device.credential_hash == credential_hash(credential))).first()
    if device is None:
        raise UnauthenticatedError("unknown device credential")
    if device.revoked:
        raise UnauthenticatedError(f"device {device.id} is revoked")
    return device


@dataclass(slots=True)
class HeartbeatReport:
    """One heartbeat's fields, validated (:func:`heartbeat_report`) and ready to store."""

    model_hash: str
    active_subnet: int
    budget: dict[str, float]
    metrics: dict[str, float]
    state: str
    last_error: str
    samples_pending: int
    rollbacks: list[dict]
    seen_at: datetime

    def then(self, newer: HeartbeatReport) -> HeartbeatReport:
        """Two heartbeats of one device in one flush interval: the newer one's fields, both
        ones' rollback reports."""
        if self.rollbacks:
            newer.rollbacks = merge_rollbacks(self.rollbacks, newer.rollbacks)
        return newer


def heartbeat_report(
    *,
    model_hash: str,
    active_subnet: int,
    budget: dict[str, float],
    metrics: dict[str, float],
    state: str,
    last_error: str,
    samples_pending: int,
    rollbacks: list[dict] | None = None,
) -> HeartbeatReport:
    """Validate what a heartbeat reports (:class:`InvalidArgumentError` refuses all of it)."""
    if len(metrics) > MAX_METRICS or any(len(k) > 64 for k in metrics):
        raise InvalidArgumentError(f"metrics: at most {MAX_METRICS} entries with names <= 64 chars")
    if model_hash and not re.fullmatch(r"[0-9a-f]{64}", model_hash):
        raise InvalidArgumentError("model_hash must be empty or 64 lowercase hex characters")
    return HeartbeatReport(
        model_hash=model_hash, active_subnet=int(active_subnet), budget=dict(budget),
        metrics={k: float(v) for k, v in metrics.items()}, state=_clip(state, 32, "state"),
        last_error=_clip(last_error, 4096, "last_error"), samples_pending=max(0, int(samples_pending)),
        rollbacks=merge_rollbacks([], rollbacks) if rollbacks else [], seen_at=utcnow(),
    )


def apply_heartbeat(device: Device, report: HeartbeatReport) -> Device:
    device.model_hash = report.model_hash
    device.active_subnet = report.active_subnet
    device.budget = report.budget
    device.metrics = report.metrics
    device.state = report.state
    if report.rollbacks:
        device.rollbacks = merge_rollbacks(device.rollbacks or [], report.rollbacks)  # a new list: JSON change seen
    device.last_error = report.last_error
    device.samples_pending = report.samples_pending
    device.last_seen_at = report.seen_at
    return device


def record_heartbeat(session: Session, device: Device, **fields) -> Device:  # noqa: ANN003 - heartbeat_report's
    """Store what a heartbeat reports. ``rollbacks`` ({model_hash, reason, at_ms} each) are
    merged into the device's history: a report already held is not a new rollback."""
    return apply_heartbeat(device, heartbeat_report(**fields))


def write_heartbeats(session: Session, reports: dict[str, HeartbeatReport], chunk: int = 500) -> int:
    """Store the heartbeats of many devices (device id -> its latest report) in the caller's
    transaction with a few batched statements: no row is loaded except the rollback history
    of devices that reported rollbacks. Unknown ids are skipped. Returns the rows written."""
    table = cast(Table, Device.__table__)
    ids = list(reports)
    held: dict[str, list] = {}
    with_rollbacks = [i for i in ids if reports[i].rollbacks]
    for start in range(0, len(with_rollbacks), chunk):
        part = with_rollbacks[start : start + chunk]
        held.update((r[0], r[1]) for r in session.execute(select(table.c.id, table.c.rollbacks).where(table.c.id.in_(part))))
    fields = ("model_hash", "active_subnet", "budget", "metrics", "state", "last_error", "samples_pending")
    plain, merged = [], []
    for device_id in ids:
        r = reports[device_id]
        row = {"b_id": device_id, "last_seen_at": r.seen_at, **{f: getattr(r, f) for f in fields}}
        if r.rollbacks:
            if device_id not in held:
                continue  # deleted meanwhile
            merged.append({**row, "rollbacks": merge_rollbacks(held[device_id] or [], r.rollbacks)})
        else:
            plain.append(row)
    written = 0
    for rows in (plain, merged):
        if not rows:
            continue
        cols = [k for k in rows[0] if k != "b_id"]
        stmt = update(table).where(table.c.id == bindparam("b_id")).values({c: bindparam(c) for c in cols})
        for start in range(0, len(rows), chunk):
            result = session.execute(stmt, rows[start : start + chunk])
            written += max(0, getattr(result, "rowcount", 0) or 0)
    return written


def merge_rollbacks(held: list[dict], reported: list[dict]) -> list[dict]:
    """``held`` plus the validated ``reported`` entries not in it yet, newest last, bounded."""
    if len(reported) > MAX_ROLLBACK_REPORTS:
        raise InvalidArgumentError(f"rollbacks: at most {MAX_ROLLBACK_REPORTS} per heartbeat")
    merged = list(held)
    seen = {(r.get("model_hash"), r.get("at_ms")) for r in held}
    for r in reported:
        model_hash, at_ms = r.get("model_hash", ""), r.get("at_ms")
        if not re.fullmatch(r"[0-9a-f]{64}", str(model_hash)):
            raise InvalidArgumentError("rollbacks: model_hash must be 64 lowercase hex characters")
        if not isinstance(at_ms, int) or isinstance(at_ms, bool) or at_ms < 0:
            raise InvalidArgumentError("rollbacks: at_ms must be a non-negative integer")
        entry = {"model_hash": model_hash, "reason": _clip(str(r.get("reason", "")), 1024, "rollback reason"),
                 "at_ms": at_ms}
        if (model_hash, at_ms) not in seen:
            seen.add((model_hash, at_ms))
            merged.append(entry)
    return merged[-MAX_ROLLBACKS_KEPT:]


def set_revoked(session: Session, device_id: str, revoked: bool) -> Device:
    """Revoke a device (its credential and re-registration are refused) or restore it (it may
    register again and receives a fresh credential then)."""
    device = get_device(session, device_id)
    device.revoked = revoked
    if revoked:
        device.credential_hash = credential_hash(secrets.token_urlsafe(32))  # the old secret is dead
    return device


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} not found")
    return device


def list_devices(session: Session, *, tag: str | None = None, offset: int = 0, limit: int = 100) -> tuple[list[Device], int]:
    """One page of devices, oldest registration first, and how many match: both computed by
    the database (index ix_devices_created_at_id; the tag test is SQL, server.domain.queries)."""
    if tag is not None and not TAG.fullmatch(tag):
        return [], 0  # no device holds it (tags are validated); and "\x00" never reaches JSONB
    where = [Q.has_tag(session, Device.tags, tag)] if tag is not None else []
    rows = Q.page(session, select(Device).where(*where).order_by(Device.created_at, Device.id), offset=offset, limit=limit)
    return rows, Q.count(session, Device, *where)


COHORT_ID_CHUNK = 500  # device ids per IN (...) query: under every driver's parameter limit


def _cohort_where(session: Session, cohort: dict) -> list:
    if cohort.get("all"):
        return []
    if "tag" in cohort:
        return [Q.has_tag(session, Device.tags, cohort["tag"])]
    raise InvalidArgumentError("cohort must be {'all': true}, {'device_ids': [...]} or {'tag': '...'}")


def resolve_cohort(session: Session, cohort: dict) -> list[Device]:
    """Devices a round targets: ``{"all": true}``, ``{"device_ids": [...]}`` or ``{"tag": "x"}``,
    revoked ones left out, by id. Only the cohort's rows are read (the filter is SQL)."""
    active = Device.revoked.is_(False)
    if "device_ids" in cohort:
        wanted = sorted(set(cohort["device_ids"]))
        found: list[Device] = []
        for i in range(0, len(wanted), COHORT_ID_CHUNK):
            found.extend(session.scalars(select(Device).where(Device.id.in_(wanted[i : i + COHORT_ID_CHUNK]), active)))
        missing = set(wanted) - {d.id for d in found}
        if missing:
            raise NotFoundError(f"unknown or revoked devices in cohort: {sorted(missing)[:5]}")
        return sorted(found, key=lambda d: d.id)
    return list(session.scalars(select(Device).where(active, *_cohort_where(session, cohort)).order_by(Device.id)))


def check_cohort(session: Session, cohort: dict) -> int:
    """What :func:`resolve_cohort` checks (unknown or revoked ids: NotFoundError), without
    loading the devices: the number of devices the cohort holds now, counted by the database."""
    active = Device.revoked.is_(False)
    if "device_ids" in cohort:
        wanted = sorted(set(cohort["device_ids"]))
        found: set[str] = set()
        for i in range(0, len(wanted), COHORT_ID_CHUNK):
            found.update(session.scalars(select(Device.id).where(Device.id.in_(wanted[i : i + COHORT_ID_CHUNK]), active)))
        missing = set(wanted) - found
        if missing:
            raise NotFoundError(f"unknown or revoked devices in cohort: {sorted(missing)[:5]}")
        return len(found)
    return Q.count(session, Device, active, *_cohort_where(session, cohort))
