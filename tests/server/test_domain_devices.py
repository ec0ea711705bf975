"""Device registration, credentials, heartbeats and cohorts on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from server.db.engine import transaction
from server.db.models import Device
from server.domain import devices as D
from server.domain import enrollment
from server.domain.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError
from server.domain.versions import latest_version
from tests.server.grpc_fleet import create_enrollment_token


def register(ctx, hardware_id: str = "hw-1", token: str | None = None, **kw) -> tuple[str, str]:
    with transaction(ctx.factory) as s:
        reg = enrollment.register(s, enrollment_token=_token(ctx) if token is None else token,
                                  hardware_id=hardware_id, **kw)
        return reg.device.id, reg.credential


_LAST: list = [None, ""]  # (server context, its token): one token per test's context


def _token(ctx) -> str:
    if _LAST[0] is not ctx:
        _LAST[:] = [ctx, create_enrollment_token(ctx)]
    return _LAST[1]


def auth(ctx, credential: str) -> str:
    with transaction(ctx.factory) as s:
        return D.authenticate(s, credential).id


def test_register_creates_a_device_that_runs_the_fleet_default(server_ctx):
    device_id, cred = register(server_ctx, name="cam-1", tags=["site-a", "jetson", "site-a"],
                               hardware={"cpu": "arm64"}, agent_version="0.1.0")
    with transaction(server_ctx.factory) as s:
        dev = s.get(Device, device_id)
        assert dev.name == "cam-1" and dev.tags == ["jetson", "site-a"]
        assert dev.hardware == {"cpu": "arm64"} and dev.agent_version == "0.1.0"
        assert dev.target_model_hash == latest_version(s).model_hash  # version 0
        assert dev.credential_hash == D.credential_hash(cred) != cred  # only the hash is stored
        assert not dev.revoked and dev.last_seen_at is not None
    assert auth(server_ctx, cred) == device_id


def test_register_is_idempotent_per_hardware_id_and_reissuing_revokes_the_old_credential(server_ctx):
    first_id, first = register(server_ctx, "hw-1", tags=["a"])
    second_id, second = register(server_ctx, "  hw-1 ", tags=["b"])  # surrounding spaces ignored
    assert second_id == first_id and second != first
    with pytest.raises(UnauthenticatedError, match="unknown"):
        auth(server_ctx, first)
    assert auth(server_ctx, second) == first_id
    other_id, _ = register(server_ctx, "hw-2")
    assert other_id != first_id
    with transaction(server_ctx.factory) as s:
        assert s.get(Device, first_id).tags == ["a", "b"]  # tags accumulate
        assert len(list(s.scalars(select(Device)))) == 2


def test_bad_enrollment_token_creates_nothing(server_ctx):
    for token in ("wrong-token", "", _token(server_ctx) + "x", _token(server_ctx)[:-1]):
        with pytest.raises(UnauthenticatedError, match="enrollment token"):
            register(server_ctx, "hw-x", token=token)
    with transaction(server_ctx.factory) as s:
        assert list(s.scalars(select(Device))) == []


BAD_REGISTRATIONS = [
    (dict(hardware_id=""), "hardware_id"),
    (dict(hardware_id="   "), "hardware_id"),
    (dict(hardware_id="h" * 129), "hardware_id"),
    (dict(tags=["Site-A"]), "tags"),
    (dict(tags=["has space"]), "tags"),
    (dict(tags=["x" * 65]), "tags"),
    (dict(tags=[""]), "tags"),
    (dict(tags=[f"t{i}" for i in range(33)]), "at most 32 tags"),
    (dict(hardware={f"k{i}": "v" for i in range(65)}), "hardware"),
    (dict(hardware={"k": "v" * 257}), "hardware"),
    (dict(name="n" * 129), "name"),
    (dict(agent_version="v" * 65), "agent_version"),
]


def test_registration_input_validation(server_ctx):
    for kwargs, message in BAD_REGISTRATIONS:
        kwargs = {"hardware_id": "hw-1", **kwargs}
        with pytest.raises(InvalidArgumentError, match=message):
            register(server_ctx, **kwargs)
    with transaction(server_ctx.factory) as s:
        assert list(s.scalars(select(Device))) == []  # nothing half-created


def test_validate_tags_normalises():
    assert D.validate_tags(["b", "a.x", "a_1", "b"]) == ["a.x", "a_1", "b"]


@pytest.mark.parametrize("tag", ["lab\n", "Lab", "", "a" * 65, "a b"])
def test_validate_tags_refuses_what_the_pattern_does_not_cover(tag):
    # "$" alone would let a trailing newline through (re.match): tags name cohorts and lineages.
    with pytest.raises(InvalidArgumentError, match="tags must match"):
        D.validate_tags([tag])


def test_authenticate_refuses_missing_unknown_and_revoked(server_ctx):
    device_id, cred = register(server_ctx)
    with pytest.raises(UnauthenticatedError, match="missing"):
        auth(server_ctx, "")
    with pytest.raises(UnauthenticatedError, match="unknown"):
        auth(server_ctx, cred[:-1])
    with transaction(server_ctx.factory) as s:
        s.get(Device, device_id).revoked = True
    with pytest.raises(UnauthenticatedError, match="revoked"):
        auth(server_ctx, cred)
    with transaction(server_ctx.factory) as s:
        D.set_revoked(s, device_id, True)  # what the REST revoke does: also kills the secret
    # Revoked devices cannot register their way back in ...
    with pytest.raises(UnauthenticatedError, match="restore"):
        register(server_ctx)
    # ... until an operator restores them; the old credential stays dead.
    with transaction(server_ctx.factory) as s:
        D.set_revoked(s, device_id, False)
    with pytest.raises(UnauthenticatedError, match="unknown"):
        auth(server_ctx, cred)
    again_id, fresh = register(server_ctx)
    assert again_id == device_id and auth(server_ctx, fresh) == device_id


def test_heartbeat_records_state(server_ctx):
    device_id, cred = register(server_ctx)
    mh = "ab" * 32
    with transaction(server_ctx.factory) as s:
        dev = D.authenticate(s, cred)
        D.record_heartbeat(s, dev, model_hash=mh, active_subnet=2, budget={"latency_ms": 5.0},
                           metrics={"accuracy": 0.9, "queue_len": 3}, state="idle", last_error="",
                           samples_pending=-5)
    with transaction(server_ctx.factory) as s:
        dev = s.get(Device, device_id)
        assert dev.model_hash == mh and dev.active_subnet == 2 and dev.budget == {"latency_ms": 5.0}
        assert dev.metrics == {"accuracy": 0.9, "queue_len": 3.0} and dev.state == "idle"
        assert dev.samples_pending == 0  # clamped


BAD_HEARTBEATS = [
    (dict(model_hash="AB" * 32), "model_hash"),
    (dict(model_hash="ab" * 31), "model_hash"),
    (dict(metrics={f"m{i}": 1.0 for i in range(129)}), "metrics"),
    (dict(metrics={"m" * 65: 1.0}), "metrics"),
    (dict(state="s" * 33), "state"),
    (dict(last_error="e" * 4097), "last_error"),
]


def test_heartbeat_validation(server_ctx):
    _, cred = register(server_ctx)
    args = dict(model_hash="", active_subnet=-1, budget={}, metrics={}, state="idle", last_error="", samples_pending=0)
    for changes, message in BAD_HEARTBEATS:
        with pytest.raises(InvalidArgumentError, match=message):
            with transaction(server_ctx.factory) as s:
                D.record_heartbeat(s, D.authenticate(s, cred), **{**args, **changes})


def test_cohorts_and_listing(server_ctx):
    a, _ = register(server_ctx, "hw-a", tags=["site-a"])
    b, _ = register(server_ctx, "hw-b", tags=["site-b"])
    c, _ = register(server_ctx, "hw-c", tags=["site-a"])
    with transaction(server_ctx.factory) as s:
        s.get(Device, c).revoked = True
    with transaction(server_ctx.factory) as s:
        assert {d.id for d in D.resolve_cohort(s, {"all": True})} == {a, b}
        assert [d.id for d in D.resolve_cohort(s, {"tag": "site-a"})] == [a]
        assert [d.id for d in D.resolve_cohort(s, {"device_ids": [b]})] == [b]
        with pytest.raises(NotFoundError, match="revoked"):
            D.resolve_cohort(s, {"device_ids": [a, c]})
        with pytest.raises(InvalidArgumentError):
            D.resolve_cohort(s, {"everyone": True})
        page, total = D.list_devices(s, offset=1, limit=1)
        assert total == 3 and len(page) == 1
        assert {d.id for d in D.list_devices(s, tag="site-a")[0]} == {a, c}
        assert D.get_device(s, a).id == a
        with pytest.raises(NotFoundError):
            D.get_device(s, "nope")
