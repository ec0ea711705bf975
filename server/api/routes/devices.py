"""Devices: list, inspect, rename/retag, revoke, restore."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.api.deps import CtxDep, SessionDep, require_scope
from server.api.errors import responses
from server.api.pagination import DEFAULT_LIMIT, DeviceOffset, LimitParam
from server.api.schemas import DevicePublic, DevicesPublic, DeviceStatusPublic, DeviceUpdate
from server.db.models import Device
from server.domain import devices as D
from server.settings import ServerSettings

router = APIRouter(prefix="/devices", tags=["devices"], responses=responses(401, 422))

DeviceId = Annotated[str, Path(max_length=64, description="Device id (from GET /api/v1/devices).")]
ONLINE_HEARTBEATS = 3  # a device is online if heard from within this many heartbeat intervals


def is_online(device: Device, settings: ServerSettings, now: datetime | None = None) -> bool:
    if device.revoked or device.last_seen_at is None:
        return False
    seen = device.last_seen_at
    if seen.tzinfo is None:  # SQLite drops the zone; stored values are UTC
        seen = seen.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return now - seen <= timedelta(seconds=ONLINE_HEARTBEATS * settings.heartbeat_interval_s)


def _status_fields(device: Device, settings: ServerSettings) -> dict:
    return dict(
        id=device.id, online=is_online(device, settings), revoked=device.revoked,
        last_seen_at=device.last_seen_at, state=device.state, model_hash=device.model_hash,
        target_model_hash=device.target_model_hash,
        up_to_date=bool(device.model_hash) and device.model_hash == device.target_model_hash,
        active_subnet=device.active_subnet, budget=device.budget or {}, metrics=device.metrics or {},
        last_error=device.last_error, samples_pending=device.samples_pending,
        update_state=device.update_state, rollbacks=list(device.rollbacks or []),
    )


def device_public(device: Device, settings: ServerSettings) -> DevicePublic:
    return DevicePublic(
        **_status_fields(device, settings), hardware_id=device.hardware_id, name=device.name,
        tags=list(device.tags or []), hardware=device.hardware or {}, agent_version=device.agent_version,
        created_at=device.created_at,
    )


@router.get("", response_model=DevicesPublic, dependencies=[require_scope("read")])
def list_devices(
    session: SessionDep,
    ctx: CtxDep,
    tag: Annotated[str | None, Query(max_length=64, description="Only devices with this tag.")] = None,
    offset: DeviceOffset = 0,
    limit: LimitParam = DEFAULT_LIMIT,
) -> DevicesPublic:
    """Registered devices (revoked ones included), oldest registration first."""
    devices, count = D.list_devices(session, tag=tag, offset=offset, limit=limit)
    return DevicesPublic(data=[device_public(d, ctx.settings) for d in devices], count=count)


@router.get("/{device_id}", response_model=DevicePublic, responses=responses(404), dependencies=[require_scope("read")])
def get_device(device_id: DeviceId, session: SessionDep, ctx: CtxDep) -> DevicePublic:
    """One device: identity, tags, hardware and its live status."""
    return device_public(D.get_device(session, device_id), ctx.settings)


@router.get("/{device_id}/status", response_model=DeviceStatusPublic, responses=responses(404),
            dependencies=[require_scope("read")])
def get_device_status(device_id: DeviceId, session: SessionDep, ctx: CtxDep) -> DeviceStatusPublic:
    """Only what the device's heartbeats report: model, subnet, budget, metrics, state."""
    return DeviceStatusPublic(**_status_fields(D.get_device(session, device_id), ctx.settings))


@router.patch("/{device_id}", response_model=DevicePublic, responses=responses(404, 413), dependencies=[require_scope("admin")])
def update_device(device_id: DeviceId, body: DeviceUpdate, session: SessionDep, ctx: CtxDep) -> DevicePublic:
    """Rename a device or replace its tag set; omitted fields are kept."""
    device = D.get_device(session, device_id)
    if body.tags is not None:
        device.tags = D.validate_tags(body.tags)
    if body.name is not None:
        device.name = body.name
    session.commit()
    return device_public(device, ctx.settings)


@router.post("/{device_id}/revoke", response_model=DevicePublic, responses=responses(404), dependencies=[require_scope("admin")])
def revoke_device(device_id: DeviceId, session: SessionDep, ctx: CtxDep) -> DevicePublic:
    """Refuse the device's credential from now on, and refuse its re-registration until it is
    restored (idempotent)."""
    device = D.set_revoked(session, device_id, True)
    session.commit()
    ctx.devices_changed.notify({"device_id": device_id})  # cached credentials dropped, open streams cut
    return device_public(device, ctx.settings)


@router.post("/{device_id}/restore", response_model=DevicePublic, responses=responses(404), dependencies=[require_scope("admin")])
def restore_device(device_id: DeviceId, session: SessionDep, ctx: CtxDep) -> DevicePublic:
    """Lift a revocation: the device may register again (with the enrollment token) and gets
    a fresh credential; its old credential stays invalid (idempotent)."""
    device = D.set_revoked(session, device_id, False)
    session.commit()
    ctx.devices_changed.notify({"device_id": device_id})
    return device_public(device, ctx.settings)
