"""Managed enrollment (issue 9 item 3) on SQLite and PostgreSQL: tokens with an expiry, a use
limit and granted tags; refusals change nothing; the last use goes to exactly one racer;
Register over a real gRPC server maps each refusal to its status code."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import func, select

from protos.edgeloop.v1 import fleet_pb2 as pb
from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Device, Enrollment, EnrollmentToken
from server.domain import devices as D
from server.domain import enrollment as E
from server.domain.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from tests.server.grpc_fleet import md


def _create(ctx, **kw) -> E.IssuedToken:
    with transaction(ctx.factory) as s:
        return E.create_token(s, **{"name": "t", **kw})


def _register(ctx, token: str, hardware_id: str = "hw-1", **kw):
    with transaction(ctx.factory) as s:
        return E.register(s, enrollment_token=token, hardware_id=hardware_id, **kw)


def _state(ctx) -> tuple[int, dict[str, int], int]:
    """(devices, uses per token id, enrollments): what a refusal must leave unchanged."""
    with transaction(ctx.factory) as s:
        return (s.scalar(select(func.count()).select_from(Device)),
                {t.id: t.uses for t in s.scalars(select(EnrollmentToken))},
                s.scalar(select(func.count()).select_from(Enrollment)))


def test_token_secret_is_shown_once_and_stored_hashed(server_ctx):
    issued = _create(server_ctx, name="site a", tags=["site-a", "cam", "cam"], max_uses=5)
    assert issued.secret.startswith(f"elen_{issued.token.id}_") and len(issued.secret) == 5 + 16 + 1 + 43
    with transaction(server_ctx.factory) as s:
        (row,) = E.list_tokens(s)
        assert row.secret_hash == E.secret_hash(issued.secret) and issued.secret not in row.secret_hash
        assert row.tags == ["cam", "site-a"] and row.max_uses == 5 and row.uses == 0
        assert E.status(row) == "active"
        assert timedelta(hours=23, minutes=59) < E.as_utc(row.expires_at) - utcnow() <= E.DEFAULT_TTL


@pytest.mark.parametrize("kw, message", [
    (dict(name=""), "name"), (dict(name="x" * 65), "name"), (dict(name="a\nb"), "name"),
    (dict(max_uses=0), "max_uses"), (dict(max_uses=E.MAX_USES_LIMIT + 1), "max_uses"),
    (dict(expires_in=timedelta(seconds=59)), "expiry"), (dict(expires_in=timedelta(days=367)), "expiry"),
    (dict(tags=["Bad Tag"]), "tags"),
])
def test_create_token_validates(server_ctx, kw, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _create(server_ctx, **kw)
    assert _state(server_ctx) == (0, {}, 0)


def test_parse_duration():
    assert E.parse_duration("90s") == timedelta(seconds=90)
    assert E.parse_duration("7d") == timedelta(days=7) and E.parse_duration(" 2W ") == timedelta(weeks=2)
    for bad in ("", "7", "d", "1.5h", "-1d", "7 d", "5y"):
        with pytest.raises(InvalidArgumentError, match="duration"):
            E.parse_duration(bad)


def test_register_grants_the_token_tags_and_counts_uses(server_ctx):
    issued = _create(server_ctx, tags=["site-a"], max_uses=2)
    reg = _register(server_ctx, issued.secret, "hw-1", tags=["jetson"])
    assert reg.device.tags == ["jetson", "site-a"]
    _register(server_ctx, issued.secret, "hw-2")
    before = _state(server_ctx)
    assert before == (2, {issued.token.id: 2}, 2)
    with pytest.raises(PermissionDeniedError, match="used up"):
        _register(server_ctx, issued.secret, "hw-3")
    assert _state(server_ctx) == before  # no device row, no use consumed
    with transaction(server_ctx.factory) as s:
        assert E.status(s.get(EnrollmentToken, issued.token.id)) == "used_up"


def _credential_hash(ctx, device_id: str) -> str:
    with transaction(ctx.factory) as s:
        return s.get(Device, device_id).credential_hash


def test_reregistering_with_the_enrolling_token_uses_nothing(server_ctx):
    """A device that lost its credential registers again with the token that enrolled it,
    even once that token is used up."""
    first = _create(server_ctx, max_uses=1)
    a = _register(server_ctx, first.secret, "hw-1")
    b = _register(server_ctx, first.secret, " hw-1 ")  # the id is stripped, as at enrollment
    assert b.device.id == a.device.id and b.credential != a.credential
    assert _state(server_ctx) == (1, {first.token.id: 1}, 1)


def test_another_token_cannot_take_over_an_enrolled_device(server_ctx):
    """A hardware id is no secret: a token that did not enrol a device (even one with uses
    left, e.g. a fleet's shared token) cannot re-register it, and nothing changes."""
    mine = _create(server_ctx, max_uses=1)
    victim = _register(server_ctx, mine.secret, "hw-1")
    shared = _create(server_ctx, max_uses=1000, tags=["evil"])
    _register(server_ctx, shared.secret, "hw-2")
    before, held = _state(server_ctx), _credential_hash(server_ctx, victim.device.id)
    for hw in ("hw-1", " hw-1"):
        with pytest.raises(PermissionDeniedError, match="already enrolled.*--reenroll"):
            _register(server_ctx, shared.secret, hw, tags=["x"])
    assert _state(server_ctx) == before  # no use consumed, no enrollment recorded
    assert _credential_hash(server_ctx, victim.device.id) == held  # the real device's credential lives
    with transaction(server_ctx.factory) as s:
        assert D.authenticate(s, victim.credential).id == victim.device.id
        assert s.get(Device, victim.device.id).tags == []


def test_a_reenroll_token_re_registers_any_device_and_rotates_its_credential(server_ctx):
    mine = _create(server_ctx, max_uses=1)
    old = _register(server_ctx, mine.secret, "hw-1")
    fix = _create(server_ctx, max_uses=1, tags=["replaced"], reenroll=True)
    with transaction(server_ctx.factory) as s:
        assert s.get(EnrollmentToken, fix.token.id).reenroll and not s.get(EnrollmentToken, mine.token.id).reenroll
    reg = _register(server_ctx, fix.secret, "hw-1")
    assert reg.device.id == old.device.id and reg.device.tags == ["replaced"]
    with transaction(server_ctx.factory) as s, pytest.raises(UnauthenticatedError):
        D.authenticate(s, old.credential)  # rotated: the old credential is dead
    with transaction(server_ctx.factory) as s:
        assert D.authenticate(s, reg.credential).id == old.device.id
    assert _state(server_ctx) == (1, {mine.token.id: 1, fix.token.id: 1}, 2)  # it counted a use
    again = _register(server_ctx, fix.secret, "hw-1")  # now it enrolled hw-1: no further use
    assert again.device.id == old.device.id and _state(server_ctx)[1][fix.token.id] == 1


def test_expired_and_revoked_tokens_are_refused_and_change_nothing(server_ctx):
    old = _create(server_ctx, expires_in=timedelta(hours=1), max_uses=10)
    _register(server_ctx, old.secret, "hw-1")  # enrolled while valid
    later = utcnow() + timedelta(hours=1, seconds=1)
    revoked = _create(server_ctx, max_uses=10)
    with transaction(server_ctx.factory) as s:
        first = E.revoke_token(s, revoked.token.id).revoked_at
    with transaction(server_ctx.factory) as s:
        assert E.as_utc(E.revoke_token(s, revoked.token.id).revoked_at) == E.as_utc(first)  # idempotent
    before = _state(server_ctx)
    for token, now, state in ((old.secret, later, "expired"), (revoked.secret, None, "revoked")):
        for hw in ("hw-new", "hw-1"):  # a new device, and re-registering one it enrolled
            with transaction(server_ctx.factory) as s, pytest.raises(PermissionDeniedError, match=state):
                E.register(s, enrollment_token=token, hardware_id=hw, now=now)
    assert _state(server_ctx) == before


def test_wrong_tokens_are_unauthenticated_and_say_how_to_get_one(server_ctx):
    with pytest.raises(UnauthenticatedError, match="no active enrollment token.*enrollment create"):
        _register(server_ctx, "elen_0123456789abcdef_" + "A" * 43)
    issued = _create(server_ctx)
    forged = f"elen_{issued.token.id}_" + "A" * 43  # a real id with a guessed secret
    for token in ("", "wrong-token", forged, issued.secret + "x", issued.secret[:-1], issued.secret.upper()):
        with pytest.raises(UnauthenticatedError, match="enrollment token") as err:
            _register(server_ctx, token)
        assert token == "" or "no active" not in str(err.value)
    assert _state(server_ctx) == (0, {issued.token.id: 0}, 0)


def test_a_refused_device_consumes_no_use(server_ctx):
    issued = _create(server_ctx, max_uses=5)
    reg = _register(server_ctx, issued.secret, "hw-1")
    with transaction(server_ctx.factory) as s:
        s.get(Device, reg.device.id).revoked = True
    other = _create(server_ctx, max_uses=5)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        _register(server_ctx, other.secret, "hw-1")
    with pytest.raises(InvalidArgumentError, match="tags"):
        _register(server_ctx, other.secret, "hw-2", tags=["NOPE"])
    assert _state(server_ctx) == (1, {issued.token.id: 1, other.token.id: 0}, 1)


def test_the_last_use_goes_to_exactly_one_of_racing_registrations(server_ctx):
    issued = _create(server_ctx, max_uses=1)
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        barrier.wait()
        try:
            _register(server_ctx, issued.secret, f"hw-{i}")
            result = "won"
        except PermissionDeniedError:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["refused"] * (n - 1) + ["won"]
    assert _state(server_ctx) == (1, {issued.token.id: 1}, 1)


# --- over gRPC --------------------------------------------------------------------------------


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_register_refusals_over_grpc(fleet):
    ctx = fleet.ctx
    err = _code(lambda: fleet.register(token="elen_0123456789abcdef_" + "A" * 43))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "enrollment create" in err.details()
    used = _create(ctx, max_uses=1, tags=["lab"])
    resp = fleet.register("hw-1", token=used.secret, tags=["cam"])
    with transaction(ctx.factory) as s:
        assert s.get(Device, resp.device_id).tags == ["cam", "lab"]
    revoked = _create(ctx)
    with transaction(ctx.factory) as s:
        E.revoke_token(s, revoked.token.id)
    with transaction(ctx.factory) as s:
        expired = E.create_token(s, name="old", now=utcnow() - timedelta(days=2)).secret
    before = _state(ctx)
    for token, code, words in ((used.secret, grpc.StatusCode.PERMISSION_DENIED, "used up"),
                               (revoked.secret, grpc.StatusCode.PERMISSION_DENIED, "revoked"),
                               (expired, grpc.StatusCode.PERMISSION_DENIED, "expired"),
                               ("wrong-token", grpc.StatusCode.UNAUTHENTICATED, "invalid enrollment token"),
                               ("", grpc.StatusCode.UNAUTHENTICATED, "missing enrollment token")):
        err = _code(lambda token=token: fleet.register("hw-2", token=token))
        assert (err.code(), words in err.details()) == (code, True), (token, err.details())
    assert _state(ctx) == before


def test_register_takeover_over_grpc(fleet):
    """Over a real gRPC server: a different ordinary token cannot take over an enrolled device
    (its credential keeps working); the enrolling token and a --reenroll token can."""
    ctx = fleet.ctx

    def heartbeat(credential: str) -> pb.HeartbeatResponse:
        return fleet.stub.Heartbeat(pb.HeartbeatRequest(), metadata=md(credential), timeout=10)

    mine = _create(ctx, max_uses=1)
    real = fleet.register("hw-1", token=mine.secret)
    shared = _create(ctx, max_uses=1000)
    before = _state(ctx)
    err = _code(lambda: fleet.register("hw-1", token=shared.secret))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert "already enrolled" in err.details() and "--reenroll" in err.details()
    assert _state(ctx) == before
    heartbeat(real.device_credential)  # still the real device's

    again = fleet.register("hw-1", token=mine.secret)  # the enrolling token: allowed, rotates
    assert again.device_id == real.device_id
    assert _code(lambda: heartbeat(real.device_credential)).code() == grpc.StatusCode.UNAUTHENTICATED
    fix = _create(ctx, max_uses=1, reenroll=True)
    moved = fleet.register("hw-1", token=fix.secret)
    assert moved.device_id == real.device_id
    heartbeat(moved.device_credential)
    assert _code(lambda: heartbeat(again.device_credential)).code() == grpc.StatusCode.UNAUTHENTICATED
