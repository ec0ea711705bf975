"""Read endpoints the web console needs (docs/console.md): who the token is, a fleet summary,
per-round bytes and delivery times, the version lineage, subnet accuracy against measured
latency, a device's accuracy over time, and a sample rendered as a PNG. All ``read`` scope;
the console's actions use the ordinary routes (rounds, devices, enrollment-tokens)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.api.deps import CtxDep, ScopeCheck, SessionDep, require_scope
from server.api.errors import responses
from server.api.routes.devices import is_online
from server.api.schemas import HEX64, BodyOut, Scope, UtcDatetime
from server.console.history import MetricsHistory
from server.console.png import NotAnImageError, encode_png, to_pixels
from server.db.models import Artefact, Delivery, Device, ModelVersion, OperatorToken, Round, Sample
from server.domain import rounds as R
from server.domain.errors import InvalidArgumentError, NotFoundError
from shared.samples import decode_sample

router = APIRouter(tags=["console"], responses=responses(401, 422))
READ = ScopeCheck("read")

DeviceId = Annotated[str, Path(max_length=64, description="Device id (from GET /api/v1/devices).")]
RoundId = Annotated[str, Path(max_length=64, description="Round id (from GET /api/v1/rounds).")]
SampleId = Annotated[str, Path(pattern=HEX64, description="Sample content id (SHA-256 hex, from GET /api/v1/samples).")]
RoundLimit = Annotated[int, Query(ge=1, le=1000, description="The newest this many rounds (1 to 1000).")]
VersionLimit = Annotated[int, Query(ge=1, le=1000, description="The newest this many versions (1 to 1000).")]
ROLLED_BACK_STATE = "rolled_back"


def newest_rounds(session: Session, limit: int) -> list[Round]:
    """The newest ``limit`` rounds, newest first (the order of GET /api/v1/rounds)."""
    return list(session.scalars(select(Round).order_by(Round.created_at.desc(), Round.id.desc()).limit(limit)))


def _aware(t: datetime | None) -> datetime | None:
    return None if t is None else (t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t)


# --- who am I -------------------------------------------------------------------------------


class WhoAmIPublic(BodyOut):
    token_id: str = Field(description="The calling token's id.")
    name: str = Field(description="Its name.")
    scope: Scope = Field(description="read < operate < admin: what the console lets this token do.")
    expires_at: UtcDatetime | None = Field(description="When it expires (UTC); null: never.")


@router.get("/whoami", response_model=WhoAmIPublic)
def whoami(token: Annotated[OperatorToken, Depends(READ)]) -> WhoAmIPublic:
    """The calling token's id, name and scope (the console shows only the actions it allows)."""
    return WhoAmIPublic(token_id=token.id, name=token.name, scope=token.scope,  # type: ignore[arg-type]
                        expires_at=token.expires_at)


# --- fleet summary --------------------------------------------------------------------------


class VersionUsePublic(BodyOut):
    model_hash: str = Field(description="Model hash devices report running ('' : none yet).")
    number: int | None = Field(description="Its version number (null: not a version this server knows).")
    devices: int = Field(description="Non-revoked devices running it.")


class FleetSummaryPublic(BodyOut):
    devices: int = Field(description="Registered devices (revoked included).")
    online: int = Field(description="Not revoked and heard from within 3 heartbeat intervals.")
    offline: int = Field(description="Not revoked and not online.")
    revoked: int = Field(description="Revoked devices.")
    up_to_date: int = Field(description="Non-revoked devices running their target version.")
    behind: int = Field(description="Non-revoked devices not (yet) running their target version.")
    rolled_back: int = Field(description="Non-revoked devices that rolled their target version back after probation.")
    versions_in_use: list[VersionUsePublic] = Field(description="Versions running on the fleet, most devices first.")
    latest_version: int | None = Field(description="Number of the newest version (null: none).")
    rounds_by_status: dict[str, int] = Field(description="Rounds per status.")
    samples_labelled: int = Field(description="Labelled samples.")
    samples_unlabelled: int = Field(description="Unlabelled samples.")


def _rolled_back(d: Device) -> bool:
    return d.state == ROLLED_BACK_STATE or any(r.get("model_hash") == d.target_model_hash for r in d.rollbacks or [])


@router.get("/console/fleet", response_model=FleetSummaryPublic, dependencies=[require_scope("read")])
def fleet_summary(session: SessionDep, ctx: CtxDep) -> FleetSummaryPublic:
    """Devices online / behind / rolled back, versions in use, rounds by status, sample totals."""
    devices = list(session.scalars(select(Device)))
    active = [d for d in devices if not d.revoked]
    online = sum(1 for d in active if is_online(d, ctx.settings))
    current = [d for d in active if d.model_hash and d.model_hash == d.target_model_hash]
    use: dict[str, int] = {}
    for d in active:
        use[d.model_hash] = use.get(d.model_hash, 0) + 1
    numbers = dict(session.execute(select(ModelVersion.model_hash, ModelVersion.number)
                                   .where(ModelVersion.model_hash.in_([h for h in use if h]))).all())
    labelled = session.scalar(select(func.count()).select_from(Sample).where(Sample.label.is_not(None))) or 0
    unlabelled = session.scalar(select(func.count()).select_from(Sample).where(Sample.label.is_(None))) or 0
    by_status = {status: 0 for status in R.TRANSITIONS}
    by_status.update(dict(session.execute(select(Round.status, func.count()).group_by(Round.status)).all()))
    return FleetSummaryPublic(
        devices=len(devices), online=online, offline=len(active) - online, revoked=len(devices) - len(active),
        up_to_date=len(current), behind=len(active) - len(current),
        rolled_back=sum(1 for d in active if _rolled_back(d)),
        versions_in_use=[VersionUsePublic(model_hash=h, number=numbers.get(h), devices=n)
                         for h, n in sorted(use.items(), key=lambda kv: (-kv[1], kv[0]))],
        latest_version=session.scalar(select(func.max(ModelVersion.number))),
        rounds_by_status=by_status, samples_labelled=labelled, samples_unlabelled=unlabelled,
    )


# --- rounds: bytes and delivery -------------------------------------------------------------


class RoundStatsPublic(BodyOut):
    id: str = Field(description="Round id.")
    status: str = Field(description="Round status.")
    method: str = Field(description="Update policy.")
    variant: str = Field(description="What it shipped, as the policy recorded it (e.g. 'dpu', 'full'; '' if unknown).")
    lineage: str = Field(description="The cohort's lineage.")
    created_at: UtcDatetime = Field(description="Creation time (UTC).")
    finished_at: UtcDatetime | None = Field(description="When it reached done, skipped or failed (UTC).")
    model_hash: str | None = Field(description="Version it published.")
    version: int | None = Field(description="Number of that version.")
    val_accuracy: float | None = Field(description="Validation accuracy of the new version.")
    base_val_accuracy: float | None = Field(description="Validation accuracy of the version it started from.")
    subnet_val_accuracy: list[float] = Field(description="Validation accuracy per DRESS subnet (densest first).")
    full_model_bytes: int | None = Field(description="Size of the new version's full-model artefact.")
    devices_total: int = Field(description="Devices the version targets.")
    devices_reached: int = Field(description="Targeted devices that received bytes of it.")
    bytes_sent: int = Field(description="Artefact bytes streamed to the targeted devices for it, in all.")
    full_equivalent_bytes: int | None = Field(
        description="What the same devices would have received as full models: full_model_bytes x devices_reached.")
    delivery_s: float | None = Field(
        description="Seconds from the round's end (publish) to the last targeted device's completed download; "
                    "null: nothing delivered yet.")


class RoundStatsListPublic(BodyOut):
    data: list[RoundStatsPublic] = Field(description="The newest rounds, oldest first (for charts over rounds).")
    count: int = Field(description="Number of rounds in data.")


def _deliveries(session: Session, hashes: list[str]) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = {}
    if hashes:
        for d in session.scalars(select(Delivery).where(Delivery.final_model_hash.in_(hashes))):
            out.setdefault(d.final_model_hash, []).append(d)
    return out


def _delivery_s(rnd: Round, rows: list[Delivery]) -> float | None:
    done = [_aware(d.updated_at) for d in rows if d.completed and d.target_model_hash == d.final_model_hash]
    end, start = max((t for t in done if t), default=None), _aware(rnd.finished_at)
    return None if end is None or start is None else max(0.0, (end - start).total_seconds())


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _round_stats(rnd: Round, rows: list[Delivery], version: ModelVersion | None, full_size: int | None) -> RoundStatsPublic:
    m = rnd.metrics or {}
    targeted = set(rnd.device_ids or [])
    rows = [d for d in rows if d.device_id in targeted]
    per_device: dict[str, int] = {}
    for d in rows:
        per_device[d.device_id] = per_device.get(d.device_id, 0) + d.bytes_sent
    reached = sum(1 for n in per_device.values() if n > 0)
    full = int(m["full_model_bytes"]) if isinstance(m.get("full_model_bytes"), (int, float)) else full_size
    return RoundStatsPublic(
        id=rnd.id, status=rnd.status, method=rnd.method, variant=str(m.get("variant") or ""), lineage=rnd.lineage,
        created_at=rnd.created_at, finished_at=rnd.finished_at, model_hash=rnd.model_hash,
        version=version.number if version else None, val_accuracy=_float(m.get("val_accuracy")),
        base_val_accuracy=_float(m.get("base_val_accuracy")),
        subnet_val_accuracy=[float(a) for a in m.get("subnet_val_accuracy") or [] if _float(a) is not None],
        full_model_bytes=full, devices_total=len(targeted), devices_reached=reached,
        bytes_sent=sum(per_device.values()), full_equivalent_bytes=None if full is None else full * reached,
        delivery_s=_delivery_s(rnd, rows),
    )


@router.get("/console/rounds", response_model=RoundStatsListPublic, dependencies=[require_scope("read")])
def round_stats(session: SessionDep, limit: RoundLimit = 100) -> RoundStatsListPublic:
    """Per round: accuracy, bytes sent against what full models would have cost, delivery time."""
    rounds = list(reversed(newest_rounds(session, limit)))
    hashes = [r.model_hash for r in rounds if r.model_hash]
    versions = {v.model_hash: v for v in session.scalars(select(ModelVersion).where(ModelVersion.model_hash.in_(hashes)))}
    sizes = dict(session.execute(select(Artefact.sha256, Artefact.size).where(
        Artefact.sha256.in_([v.full_artefact_sha256 for v in versions.values()]))).all())
    deliveries = _deliveries(session, hashes)
    data = []
    for r in rounds:
        v = versions.get(r.model_hash or "")
        data.append(_round_stats(r, deliveries.get(r.model_hash or "", []), v,
                                 sizes.get(v.full_artefact_sha256) if v else None))
    return RoundStatsListPublic(data=data, count=len(data))


class DeliveredArtefactPublic(BodyOut):
    artefact_sha256: str = Field(description="The artefact streamed.")
    kind: str = Field(description="'full', 'diff', 'seed' or 'adaptor' (from its encoding).")
    encoding: str = Field(description="Its wire encoding.")
    size: int = Field(description="Its size in bytes.")
    base_model_hash: str | None = Field(description="The version it applies to (null: a full model).")
    target_model_hash: str = Field(description="The version it produces.")
    bytes_sent: int = Field(description="Bytes of it streamed to the device (resumed downloads summed).")
    completed: bool = Field(description="The device downloaded all of it.")
    started_at: UtcDatetime = Field(description="First byte (UTC).")
    updated_at: UtcDatetime = Field(description="Last byte (UTC).")


class DeviceDeliveryPublic(BodyOut):
    device_id: str = Field(description="A device of the round's cohort.")
    name: str = Field(description="Its name ('' if the device is gone).")
    bytes_sent: int = Field(description="Bytes streamed to it towards the round's version.")
    delivery_s: float | None = Field(description="Seconds from publish to its last completed artefact (null: not yet).")
    chain: list[DeliveredArtefactPublic] = Field(description="The artefacts it was sent, in the order it fetched them.")


class RoundDeliveriesPublic(BodyOut):
    round_id: str = Field(description="The round.")
    model_hash: str | None = Field(description="Version it published (null: none; then data is empty).")
    full_model_bytes: int | None = Field(description="Size of that version's full model.")
    data: list[DeviceDeliveryPublic] = Field(description="One entry per targeted device.")
    count: int = Field(description="Number of entries.")


def _kind(a: Artefact | None) -> str:
    if a is None:
        return "unknown"
    for word in ("seed", "adaptor"):
        if word in a.encoding:
            return word
    return "diff" if a.base_model_hash else "full"


@router.get("/console/rounds/{round_id}/deliveries", response_model=RoundDeliveriesPublic,
            responses=responses(404), dependencies=[require_scope("read")])
def round_deliveries(round_id: RoundId, session: SessionDep) -> RoundDeliveriesPublic:
    """Per targeted device: bytes, delivery time and the chain of artefacts delivered."""
    rnd = R.get_round(session, round_id)
    if not rnd.model_hash:
        return RoundDeliveriesPublic(round_id=rnd.id, model_hash=None, full_model_bytes=None, data=[], count=0)
    rows = _deliveries(session, [rnd.model_hash]).get(rnd.model_hash, [])
    arts = {a.sha256: a for a in session.scalars(select(Artefact).where(
        Artefact.sha256.in_({d.artefact_sha256 for d in rows})))}
    version = session.get(ModelVersion, rnd.model_hash)
    full = session.get(Artefact, version.full_artefact_sha256) if version else None
    names = dict(session.execute(select(Device.id, Device.name).where(Device.id.in_(rnd.device_ids or []))).all())
    data = []
    for device_id in rnd.device_ids or []:
        mine = sorted((d for d in rows if d.device_id == device_id), key=lambda d: (d.started_at, d.id))
        chain = [DeliveredArtefactPublic(
            artefact_sha256=d.artefact_sha256, kind=_kind(arts.get(d.artefact_sha256)),
            encoding=a.encoding if (a := arts.get(d.artefact_sha256)) else "", size=a.size if a else 0,
            base_model_hash=a.base_model_hash if a else None, target_model_hash=d.target_model_hash,
            bytes_sent=d.bytes_sent, completed=d.completed, started_at=d.started_at, updated_at=d.updated_at)
            for d in mine]
        data.append(DeviceDeliveryPublic(device_id=device_id, name=names.get(device_id, ""),
                                         bytes_sent=sum(d.bytes_sent for d in mine),
                                         delivery_s=_delivery_s(rnd, mine), chain=chain))
    return RoundDeliveriesPublic(round_id=rnd.id, model_hash=rnd.model_hash,
                                 full_model_bytes=full.size if full else None, data=data, count=len(data))


# --- versions as a lineage graph ------------------------------------------------------------


class VersionNodePublic(BodyOut):
    number: int = Field(description="Version number.")
    model_hash: str = Field(description="Model hash.")
    parent_hash: str | None = Field(description="Version it was trained from (an edge of the graph).")
    method: str = Field(description="How it was made.")
    lineage: str = Field(description="Lineage of the round that made it.")
    fleet_default: bool = Field(description="New devices get the newest fleet default.")
    created_at: UtcDatetime = Field(description="Publish time (UTC).")
    round_id: str | None = Field(description="Round that made it.")
    val_accuracy: float | None = Field(description="Its validation accuracy.")
    subnet_val_accuracy: list[float] = Field(description="Per DRESS subnet, densest first.")
    full_size: int = Field(description="Bytes of its full model.")
    smallest_diff_size: int | None = Field(description="Bytes of the smallest artefact from its parent (null: none).")
    devices: int = Field(description="Non-revoked devices running it now.")


class VersionGraphPublic(BodyOut):
    data: list[VersionNodePublic] = Field(description="The newest versions, oldest first.")
    count: int = Field(description="Number of versions in data.")


@router.get("/console/versions", response_model=VersionGraphPublic, dependencies=[require_scope("read")])
def version_graph(session: SessionDep, limit: VersionLimit = 200) -> VersionGraphPublic:
    """Versions with their parent edges, metrics, artefact sizes and how many devices run each."""
    versions = list(reversed(list(session.scalars(
        select(ModelVersion).order_by(ModelVersion.number.desc()).limit(limit)))))
    hashes = [v.model_hash for v in versions]
    arts = list(session.scalars(select(Artefact).where(Artefact.target_model_hash.in_(hashes))))
    sizes = {a.sha256: a.size for a in arts}
    diffs: dict[str, int] = {}
    for v in versions:
        from_parent = [a.size for a in arts if a.target_model_hash == v.model_hash and v.parent_hash
                       and a.base_model_hash == v.parent_hash]
        if from_parent:
            diffs[v.model_hash] = min(from_parent)
    running = dict(session.execute(select(Device.model_hash, func.count()).where(Device.revoked.is_(False))
                                   .group_by(Device.model_hash)).all())
    data = [VersionNodePublic(
        number=v.number, model_hash=v.model_hash, parent_hash=v.parent_hash, method=v.method, lineage=v.lineage,
        fleet_default=v.fleet_default, created_at=v.created_at, round_id=v.round_id,
        val_accuracy=_float((v.metrics or {}).get("val_accuracy")),
        subnet_val_accuracy=[float(a) for a in (v.metrics or {}).get("subnet_val_accuracy") or [] if _float(a) is not None],
        full_size=sizes.get(v.full_artefact_sha256, 0), smallest_diff_size=diffs.get(v.model_hash),
        devices=int(running.get(v.model_hash, 0))) for v in versions]
    return VersionGraphPublic(data=data, count=len(data))


# --- subnets: accuracy against measured latency ---------------------------------------------


class SubnetPointPublic(BodyOut):
    device_id: str = Field(description="Device.")
    name: str = Field(description="Its name.")
    model_hash: str = Field(description="Version it runs.")
    active_subnet: int = Field(description="Subnet it runs (-1: a plain model or not profiled yet).")
    latency_ms: float = Field(description="Latency of that subnet measured on the device (governor's estimate, ms).")
    energy_mj: float | None = Field(description="Energy per inference of that subnet (mJ), if the agent reports it.")
    val_accuracy: float | None = Field(description="The server's validation accuracy of that subnet of that version.")


class SubnetPointsPublic(BodyOut):
    data: list[SubnetPointPublic] = Field(description="One point per online device that reports a measured latency.")
    count: int = Field(description="Number of points.")


@router.get("/console/subnets", response_model=SubnetPointsPublic, dependencies=[require_scope("read")])
def subnet_points(session: SessionDep, ctx: CtxDep) -> SubnetPointsPublic:
    """Per device: the subnet it runs, its latency as measured there, and that subnet's accuracy."""
    devices = [d for d in session.scalars(select(Device).where(Device.revoked.is_(False)))
               if is_online(d, ctx.settings) and _float((d.metrics or {}).get("active_latency_ms")) is not None]
    accs = {v.model_hash: (v.metrics or {}).get("subnet_val_accuracy") or [] for v in session.scalars(
        select(ModelVersion).where(ModelVersion.model_hash.in_({d.model_hash for d in devices})))}
    data = []
    for d in devices:
        m = d.metrics or {}
        subnet_accs = accs.get(d.model_hash, [])
        acc = _float(m.get("active_accuracy"))
        if acc is None and 0 <= d.active_subnet < len(subnet_accs):
            acc = _float(subnet_accs[d.active_subnet])
        data.append(SubnetPointPublic(device_id=d.id, name=d.name, model_hash=d.model_hash,
                                      active_subnet=d.active_subnet, latency_ms=float(m["active_latency_ms"]),
                                      energy_mj=_float(m.get("active_energy_mj")), val_accuracy=acc))
    return SubnetPointsPublic(data=data, count=len(data))


# --- a device's accuracy over time ------------------------------------------------------------


class HistoryPointPublic(BodyOut):
    at: UtcDatetime = Field(description="When it was sampled (UTC, server clock).")
    accuracy: float | None = Field(description="The device's accuracy on its recent labelled inputs.")
    model_hash: str = Field(description="Version it ran.")
    active_subnet: int = Field(description="Subnet it ran.")


class DeviceHistoryPublic(BodyOut):
    device_id: str = Field(description="Device.")
    interval_s: float = Field(description="Sampling interval (the heartbeat interval).")
    data: list[HistoryPointPublic] = Field(
        description="Oldest first: one point per heartbeat interval the device was heard from, since this server "
                    "process started (in memory, at most 720).")
    count: int = Field(description="Number of points.")


@router.get("/console/devices/{device_id}/history", response_model=DeviceHistoryPublic,
            responses=responses(404), dependencies=[require_scope("read")])
def device_history(device_id: DeviceId, request: Request, session: SessionDep) -> DeviceHistoryPublic:
    """The device's accuracy, version and subnet over time (sampled from its heartbeats)."""
    if session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id!r} not found")
    history: MetricsHistory | None = getattr(request.app.state, "console_history", None)
    points = history.points(device_id) if history else []
    data = [HistoryPointPublic(at=datetime.fromtimestamp(p.at, timezone.utc), accuracy=p.accuracy,
                               model_hash=p.model_hash, active_subnet=p.active_subnet) for p in points]
    return DeviceHistoryPublic(device_id=device_id, interval_s=history.interval_s if history else 0.0,
                               data=data, count=len(data))


# --- a sample as an image -----------------------------------------------------------------------


@router.get(
    "/console/samples/{sample_id}/image.png", response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The sample's payload as a PNG image."},
               **responses(404)},
    dependencies=[require_scope("read")],
)
def sample_image(sample_id: SampleId, session: SessionDep, ctx: CtxDep) -> Response:
    """The payload of a stored sample as an 8-bit grey or RGB PNG (uint8 as is, float32 min-max
    scaled). 422 if its tensor is not an image (e.g. 1-D features)."""
    if session.scalar(select(Sample.id).where(Sample.sample_id == sample_id).limit(1)) is None:
        raise NotFoundError(f"sample {sample_id} not found")
    try:
        pixels = to_pixels(decode_sample(ctx.blobs.get(sample_id)))
    except NotAnImageError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return Response(encode_png(pixels), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400, immutable"})  # content-addressed
