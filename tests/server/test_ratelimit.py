"""Abuse limits (issue 9 item 6): the token bucket on an injected clock, then over a real gRPC
server: per-device limits on the credentialed calls and per-source limits on failed
Registers, each refused with RESOURCE_EXHAUSTED and a retry-after-ms hint, changing nothing."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.db.engine import transaction
from server.db.models import Device
from server.grpc_api.ratelimit import RateLimited, RateLimiter, StreamLimiter
from server.grpc_api.servicer import RETRY_AFTER_KEY, peer_source
from tests.server.grpc_fleet import md, stream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    rl = RateLimiter(2.0, 3, clock=clock)
    assert [rl.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.try_acquire("a") == pytest.approx(0.5)  # one token per 0.5 s
    assert rl.try_acquire("b") == 0.0  # keys are independent
    clock.now += 0.25
    assert rl.try_acquire("a") == pytest.approx(0.25)  # a refusal takes nothing
    clock.now += 0.25
    assert rl.try_acquire("a") == 0.0 and rl.try_acquire("a") == pytest.approx(0.5)
    clock.now += 100  # refills to the burst, not beyond
    assert [rl.try_acquire("a") for _ in range(4)][-1] > 0
    with pytest.raises(RateLimited, match="rate limit") as err:
        rl.acquire("a", "device a")
    assert err.value.retry_after_ms == 500


def test_refund_and_off_and_bad_arguments():
    clock = Clock()
    rl = RateLimiter(1.0, 1, clock=clock)
    assert rl.try_acquire("a") == 0.0
    rl.refund("a")
    rl.refund("a")  # never above the burst
    assert rl.try_acquire("a") == 0.0 and rl.try_acquire("a") > 0
    off = RateLimiter(0, 1, clock=clock)
    assert not off.enabled and all(off.try_acquire("a") == 0.0 for _ in range(1000)) and len(off) == 0
    for args in ((-1, 1), (float("nan"), 1), (float("inf"), 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimiter(*args)


def test_memory_is_bounded_dropping_the_least_recently_used():
    clock = Clock()
    rl = RateLimiter(1.0, 1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        rl.try_acquire(key)
    rl.try_acquire("a")  # a is now the most recently used
    rl.try_acquire("d")  # evicts b
    assert len(rl) == 3
    assert rl.try_acquire("a") > 0 and rl.try_acquire("c") > 0  # kept: still empty
    assert rl.try_acquire("b") == 0.0  # dropped: starts again with a full bucket
    for i in range(10_000):
        rl.try_acquire(f"k{i}")
    assert len(rl) == 3


def test_peer_source():
    assert peer_source("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_source("ipv6:[::1]:5555") == "::/64"  # by /64: one host usually holds a whole block
    assert peer_source("ipv6:[2001:db8:1:2:3:4:5:6]:443") == peer_source("ipv6:[2001:db8:1:2:ffff::1]:1")
    assert peer_source("ipv6:[2001:db8:1:2::1]:1") != peer_source("ipv6:[2001:db8:1:3::1]:1")
    assert peer_source("unix:/run/x.sock") == "unix:/run/x.sock"


# --- over gRPC --------------------------------------------------------------------------------


def _refused(call) -> tuple[int, str]:
    """The retry-after-ms hint and details of a call that must be RESOURCE_EXHAUSTED."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    hint = dict(err.value.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
    assert hint is not None, "no retry-after hint"
    return int(hint), err.value.details()


def test_per_device_limit_refuses_with_a_hint_and_changes_nothing(fleet_factory):
    fleet = fleet_factory(device_rate_per_s=0.5, device_burst=2)
    a = fleet.register("hw-a")
    b = fleet.register("hw-b")
    for _ in range(2):
        fleet.stub.Heartbeat(pb.HeartbeatRequest(state="idle"), metadata=md(a.device_credential), timeout=10)
    with transaction(fleet.ctx.factory) as s:
        seen = s.get(Device, a.device_id).last_seen_at
    calls = {
        "Heartbeat": lambda: fleet.stub.Heartbeat(pb.HeartbeatRequest(state="busy", samples_pending=7),
                                                  metadata=md(a.device_credential), timeout=10),
        "UploadSamples": lambda: fleet.stub.UploadSamples(stream([]), metadata=md(a.device_credential), timeout=10),
        "GetUpdate": lambda: list(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(a.device_credential),
                                                       timeout=10)),
        "WatchUpdates": lambda: list(fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=1),
                                                             metadata=md(a.device_credential), timeout=10)),
    }
    for name, call in calls.items():
        hint, details = _refused(call)
        assert 1000 < hint <= 2000, (name, hint)  # 0.5/s: under 2 s to the next token
        assert a.device_id in details and "rate limit" in details
    with transaction(fleet.ctx.factory) as s:
        dev = s.get(Device, a.device_id)
        assert (dev.last_seen_at, dev.state, dev.samples_pending) == (seen, "idle", 0)
    # Another device has its own bucket.
    fleet.stub.Heartbeat(pb.HeartbeatRequest(), metadata=md(b.device_credential), timeout=10)


def test_device_limit_off(fleet_factory):
    fleet = fleet_factory(device_rate_per_s=0, device_burst=1)
    cred = fleet.register().device_credential
    for _ in range(20):
        fleet.stub.Heartbeat(pb.HeartbeatRequest(), metadata=md(cred), timeout=10)


@pytest.fixture
def dual_stack(server_ctx):
    """The agent server listening on 127.0.0.1 and [::1]: two source addresses on one host."""
    from server.grpc_api.aio_server import AgentGrpcServer

    settings = server_ctx.settings.model_copy(update=dict(register_rate_per_s=0.01, register_burst=3))
    server = AgentGrpcServer(server_ctx, settings)
    v4 = server.add_insecure_port("127.0.0.1:0")
    v6 = server.add_insecure_port("[::1]:0")
    server.start()
    channels = [grpc.insecure_channel(f"127.0.0.1:{v4}"), grpc.insecure_channel(f"[::1]:{v6}")]
    yield [pb_grpc.EdgeFleetStub(c) for c in channels]
    for c in channels:
        c.close()
    server.stop(0)


def test_failed_registers_are_limited_per_source(dual_stack, server_ctx):
    from tests.server.grpc_fleet import create_enrollment_token

    v4, v6 = dual_stack
    token = create_enrollment_token(server_ctx)

    def register(stub, hw: str, tok: str = token):
        return stub.Register(pb.RegisterRequest(enrollment_token=tok, hardware_id=hw), timeout=10)

    for i in range(10):  # successes are not counted
        register(v4, f"ok-{i}")
    for _ in range(3):  # the burst of failures
        with pytest.raises(grpc.RpcError) as err:
            register(v4, "guess", "elen_0123456789abcdef_" + "A" * 43)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with transaction(server_ctx.factory) as s:
        before = sorted(d.hardware_id for d in s.scalars(select(Device)))
    hint, details = _refused(lambda: register(v4, "guess", "elen_0123456789abcdef_" + "A" * 43))
    assert 90_000 < hint <= 100_000 and "Register from 127.0.0.1" in details  # 0.01/s
    _refused(lambda: register(v4, "late"))  # the source waits, even with a good token
    assert register(v6, "other-source").device_id  # another source is unaffected
    with transaction(server_ctx.factory) as s:
        after = sorted(d.hardware_id for d in s.scalars(select(Device)))
    assert after == sorted([*before, "other-source"])


# --- concurrent streams per device -------------------------------------------------------------

def test_stream_limiter_caps_open_streams_and_release_is_idempotent():
    sl = StreamLimiter(2, retry_after_s=5)
    r1, r2 = sl.open("a", "a"), sl.open("a", "a")
    with pytest.raises(RateLimited, match="2 streams already open, at most 2") as err:
        sl.open("a", "device a WatchUpdates")
    assert err.value.retry_after_ms == 5000
    release_b = sl.open("b", "b")  # keys are independent
    r1()
    r1()  # a second release (callback and finally) frees nothing more
    assert sl.open_count("a") == 1
    sl.open("a", "a")
    r2()
    release_b()
    assert sl.open_count("b") == 0 and "b" not in sl._open  # no memory kept for idle keys
    off = StreamLimiter(0)
    assert all(off.open("a", "a") is not None for _ in range(100))
    with pytest.raises(ValueError):
        StreamLimiter(-1)


def test_streams_per_device_are_capped_with_a_hint_and_freed_when_one_ends(fleet_factory, wait_until):
    fleet = fleet_factory(device_max_streams=2, device_rate_per_s=0)
    a, b = fleet.register("hw-a"), fleet.register("hw-b")

    def watch(cred):
        call = fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=60), metadata=md(cred), timeout=60)
        next(call)  # the first answer: the handler holds its slot from here
        return call

    open_calls = [watch(a.device_credential), watch(a.device_credential)]
    try:
        hint, details = _refused(lambda: watch(a.device_credential))
        assert hint == 5000 and a.device_id in details and "at most 2" in details
        hint, details = _refused(lambda: list(fleet.stub.GetUpdate(
            pb.GetUpdateRequest(), metadata=md(a.device_credential), timeout=10)))
        assert hint == 5000 and "GetUpdate" in details
        _refused(lambda: fleet.stub.UploadSamples(stream([]), metadata=md(a.device_credential), timeout=10))
        open_calls.append(watch(b.device_credential))  # another device has its own slots
        open_calls.pop(0).cancel()  # a stream that ends frees its slot

        def third_opens():
            try:
                open_calls.append(watch(a.device_credential))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                return False
            return True

        wait_until(third_opens, 10, "the cancelled stream's slot to be freed")
    finally:
        for call in open_calls:
            call.cancel()
