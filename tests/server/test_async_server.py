"""The async agent server (issue 12 items 1-3) on real loopback ports and a real database:
idle streams cost no thread, a publish is one batched read pushed to every stream once, a
stream that ends wakes no one, heartbeats are written in batches and REST shows them, and
an overloaded database pool answers RESOURCE_EXHAUSTED with a retry-after-ms hint."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import grpc
import psutil
import pytest
from sqlalchemy import event, select

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.db.engine import transaction
from server.db.models import Device
from server.domain import devices as D
from server.grpc_api.aio_server import AgentGrpcServer
from server.grpc_api.heartbeats import CredentialCache
from server.grpc_api.servicer import RETRY_AFTER_KEY
from tests.server.grpc_fleet import create_enrollment_token, md


class Server:
    """AgentGrpcServer on 127.0.0.1 (plaintext) with its settings overridden, and a stub."""

    def __init__(self, ctx, **overrides) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.model_copy(update={"device_rate_per_s": 0, **overrides})
        self.grpc = AgentGrpcServer(ctx, self.settings)
        self.port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.grpc.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.EdgeFleetStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.grpc.stop(0)

    def heartbeat(self, cred: str, **kw) -> pb.HeartbeatResponse:
        return self.stub.Heartbeat(pb.HeartbeatRequest(**kw), metadata=md(cred), timeout=10)

    def watch(self, cred: str, max_seconds: int = 120):
        call = self.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=max_seconds), metadata=md(cred), timeout=120)
        first = next(call)
        assert not first.keepalive
        return call, first


@pytest.fixture
def start(server_ctx):
    started: list[Server] = []

    def make(**overrides) -> Server:
        started.append(Server(server_ctx, **overrides))
        return started[-1]

    yield make
    for s in started:
        s.close()


def devices(ctx, n: int, prefix: str = "hw") -> list[tuple[str, str]]:
    """``n`` registered devices in one transaction: (device id, credential) each."""
    with transaction(ctx.factory) as s:
        regs = [D.register_device(s, hardware_id=f"{prefix}-{i}") for i in range(n)]
        return [(r.device.id, r.credential) for r in regs]


class Statements:
    """SQL statements the server's engine executes (a real SQLAlchemy event listener)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seen: list[str] = []
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, conn, cursor, statement, *a) -> None:  # noqa: ANN001
        with self._lock:
            self.seen.append(" ".join(statement.split()).lower())

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()

    def count(self, *words: str) -> int:
        with self._lock:
            return sum(1 for st in self.seen if all(w in st for w in words))

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


def _settle(srv: Server, predicate, what: str, wait_until) -> None:
    """Wait until ``predicate(servicer)`` holds, evaluated on the server's own loop."""
    async def check():
        return predicate(srv.grpc.servicer)

    wait_until(lambda: srv.grpc.run(check()), 10, what)


# --- item 1: idle streams cost no thread ---------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_300_idle_streams_hold_no_threads_and_other_calls_still_succeed(start, server_ctx):
    srv = start(watch_keepalive_s=60.0, device_max_streams=0)
    fleet = devices(server_ctx, 301)
    probe_id, probe = fleet.pop()
    srv.heartbeat(probe)  # warm: the loop, the pool, the channel
    before = psutil.Process().num_threads()
    calls = [srv.watch(cred) for _, cred in fleet]  # 300 open streams, each has had its first message
    try:
        assert all(first.target_model_hash for _, first in calls)
        opened = psutil.Process().num_threads()
        # The old server held one handler thread per stream (300 here); now at most the
        # database pool's threads (started lazily by the first calls) are new.
        assert opened - before <= srv.grpc.pool.threads, (before, opened)
        hb = srv.heartbeat(probe, state="idle")
        assert hb.target_model_hash == calls[0][1].target_model_hash
        msgs = list(srv.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(probe), timeout=30))
        assert msgs[0].info.artefact_size == sum(len(m.chunk.data) for m in msgs[1:]) > 0
        assert psutil.Process().num_threads() - before <= srv.grpc.pool.threads
        assert srv.grpc.run(_open_streams(srv)) == 300
    finally:
        for call, _ in calls:
            call.cancel()


async def _open_streams(srv: Server) -> int:
    return srv.grpc.servicer.hub.open_streams


# --- item 2: fan-out in O(N) ---------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_publish_is_one_batched_read_pushed_to_every_stream_once(start, server_ctx, wait_until):
    n = 60
    srv = start(watch_keepalive_s=60.0)  # a message sooner than 60 s can only be a push
    fleet = devices(server_ctx, n)
    calls = [srv.watch(cred)[0] for _, cred in fleet]
    sql = Statements(server_ctx.engine)
    try:
        def retarget(target: str) -> None:
            with transaction(server_ctx.factory) as s:
                for d in s.scalars(select(Device)):
                    d.target_model_hash = target

        retarget("c" * 64)
        sql.reset()
        server_ctx.targets_changed.notify({"round_id": None, "device_ids": None})
        got = [next(c) for c in calls]
        assert [(m.target_model_hash, m.keepalive) for m in got] == [("c" * 64, False)] * n
        # One read of the devices for all n streams (n < one IN chunk), not one per stream.
        assert sql.count("select", "from devices") == 1, sql.seen

        # Ten streams end: no database work, no wake-up of the others.
        sql.reset()
        refreshes = srv.grpc.servicer.hub.refreshes
        for c in calls[:10]:
            c.cancel()
        _settle(srv, lambda sv: sv.hub.open_streams == n - 10, "the cancelled streams to leave the hub", wait_until)
        assert sql.count("") == 0 and srv.grpc.servicer.hub.refreshes == refreshes

        # An event that changes nothing pushes nothing; a change only the named devices see
        # reaches exactly their streams, and nothing else was queued before it.
        before = srv.grpc.servicer.hub.refreshes
        server_ctx.targets_changed.notify({"round_id": None, "device_ids": None})
        _settle(srv, lambda sv: sv.hub.refreshes > before and sv.hub._idle.is_set(),
                "the no-op event's refresh to finish", wait_until)
        named = [device_id for device_id, _ in fleet[10:20]]
        with transaction(server_ctx.factory) as s:
            for d in s.scalars(select(Device).where(Device.id.in_(named))):
                d.target_model_hash = "d" * 64
        sql.reset()
        server_ctx.targets_changed.notify({"round_id": None, "device_ids": named})
        assert [next(c).target_model_hash for c in calls[10:20]] == ["d" * 64] * 10
        assert sql.count("select", "from devices") == 1
        retarget("e" * 64)
        server_ctx.targets_changed.notify(None)
        assert [next(c).target_model_hash for c in calls[10:]] == ["e" * 64] * (n - 10)
    finally:
        sql.close()
        for c in calls:
            c.cancel()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rest_revoke_cuts_the_stream_and_the_cached_credential(start, server_ctx, client):
    srv = start(watch_keepalive_s=60.0, heartbeat_flush_s=1.0)  # resync every 240 s: only the event can do it
    (device_id, cred), (_, other) = devices(server_ctx, 2)
    srv.heartbeat(cred)  # the credential is cached now
    call, _ = srv.watch(cred)
    assert client.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        srv.heartbeat(cred)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    srv.heartbeat(other)  # another device is untouched


# --- item 3: heartbeats in batches --------------------------------------------------------------

def test_heartbeats_are_written_in_one_transaction_per_flush_and_rest_shows_them(start, server_ctx, client):
    k = 40
    srv = start(heartbeat_flush_s=1.0, watch_keepalive_s=60.0)  # no periodic resync read in the window
    fleet = devices(server_ctx, k)
    for _, cred in fleet:
        srv.heartbeat(cred)  # authenticated and cached: the beats below need no database read
    batcher = srv.grpc.servicer.heartbeats
    assert batcher.wait_written(k, 10)
    written = batcher.written
    sql = Statements(server_ctx.engine)
    try:
        flushes = batcher.flushes
        sent_at = datetime.now(timezone.utc)
        futures = [srv.stub.Heartbeat.future(pb.HeartbeatRequest(state="busy", samples_pending=i),
                                             metadata=md(cred), timeout=10) for i, (_, cred) in enumerate(fleet)]
        for f in futures:
            f.result()
        assert batcher.wait_written(written + k, 10)  # the flush event, not a sleep
        batches = batcher.flushes - flushes
        assert 1 <= batches <= 2  # one per flush interval (two if the k calls straddled a tick)
        assert sql.count("update devices") == batches  # one executemany statement per flush
        assert sql.count("select") == 0, sql.seen  # credentials and targets came from memory
    finally:
        sql.close()
    for i, (device_id, _) in enumerate(fleet):
        body = client.get(f"/api/v1/devices/{device_id}").json()
        assert (body["state"], body["samples_pending"]) == ("busy", i)
        # what `online` is computed from: the time of the batched heartbeat, not of the flush
        seen = datetime.fromisoformat(body["last_seen_at"].replace("Z", "+00:00"))
        assert seen >= sent_at - timedelta(seconds=1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pending_heartbeats_are_written_at_stop(server_ctx):
    srv = Server(server_ctx, heartbeat_flush_s=1.0)
    (device_id, cred), = devices(server_ctx, 1)
    try:
        srv.heartbeat(cred, state="committed", metrics={"accuracy": 0.5})
    finally:
        srv.close()
    with transaction(server_ctx.factory) as s:
        dev = s.get(Device, device_id)
        assert (dev.state, dev.metrics) == ("committed", {"accuracy": 0.5})


def test_credential_cache_is_bounded_and_a_drop_beats_a_check_in_flight():
    cache = CredentialCache(max_entries=2, ttl_s=60)
    for i in range(3):
        cache.put((f"h{i}", ""), f"d{i}", None, cache.epoch())
    assert len(cache) == 2 and cache.get(("h0", "")) is None and cache.get(("h2", "")).device_id == "d2"
    epoch = cache.epoch()  # a database check starts...
    cache.drop_device("d9")  # ...the device is revoked meanwhile...
    cache.put(("h9", ""), "d9", None, epoch)  # ...so what the check read is not cached
    assert cache.get(("h9", "")) is None
    cache.drop_device("d2")
    assert cache.get(("h2", "")) is None
    cache.put(("h1", ""), "d1", None, cache.epoch())
    cache.sync({"d1": "h1"})  # the periodic re-read: still the device's credential
    assert cache.get(("h1", "")).device_id == "d1"
    cache.sync({"d1": "other"})  # replaced behind the server's back (no event)
    assert cache.get(("h1", "")) is None
    cache.put(("h3", ""), "d3", None, cache.epoch())
    epoch = cache.epoch()  # a check in flight when the bus reconnects...
    cache.drop_all()  # ...(devices_changed without a device): everything goes
    cache.put(("h4", ""), "d4", None, epoch)
    assert len(cache) == 0 and cache.get(("h3", "")) is None


# --- overload -----------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_full_database_queue_answers_resource_exhausted_with_a_hint(start, server_ctx):
    srv = start(grpc_max_workers=1, grpc_max_pending=1, heartbeat_flush_s=1.0)
    (_, cred), = devices(server_ctx, 1)
    srv.heartbeat(cred)  # cached
    gate = threading.Event()
    srv.grpc.pool.submit(gate.wait, 30)  # the only database thread is busy, its queue full
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Register(pb.RegisterRequest(enrollment_token="elen_x_y", hardware_id="new"), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in err.value.details()
        hint = int(dict(err.value.trailing_metadata())[RETRY_AFTER_KEY])
        assert hint >= 200
        assert srv.heartbeat(cred).target_model_hash  # answered from memory meanwhile
    finally:
        gate.set()
    token = create_enrollment_token(server_ctx)
    assert srv.stub.Register(pb.RegisterRequest(enrollment_token=token, hardware_id="new"), timeout=10).device_id


# --- GetUpdate: one plan per (have, target) for the whole fan-out -------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_devices_asking_for_the_same_update_share_one_plan(start, server_ctx):
    srv = start()
    fleet = devices(server_ctx, 6)
    sql = Statements(server_ctx.engine)
    try:
        def download(cred: str) -> list[pb.GetUpdateResponse]:
            return list(srv.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(cred), timeout=30))

        first = download(fleet[0][1])
        planned = sql.count("from artefacts")
        assert planned >= 1  # the first device's plan reads the artefacts
        sql.reset()
        rest = [download(cred) for _, cred in fleet[1:]]
        # The other five get the same bytes and signatures without planning again.
        assert sql.count("from artefacts") == 0, sql.seen
        for msgs in rest:
            assert msgs[0].info == first[0].info
            assert b"".join(m.chunk.data for m in msgs[1:]) == b"".join(m.chunk.data for m in first[1:])
        # A publish may offer a cheaper path: the next device plans afresh.
        server_ctx.targets_changed.notify({"round_id": None, "device_ids": None})
        download(fleet[0][1])
        assert sql.count("from artefacts") >= 1
        # A resume of a cached plan honours its offset.
        info = first[0].info
        resumed = list(srv.stub.GetUpdate(pb.GetUpdateRequest(artefact_sha256=info.artefact_sha256, offset=5),
                                          metadata=md(fleet[1][1]), timeout=30))
        assert resumed[0].info.offset == 5 and resumed[1].chunk.offset == 5
    finally:
        sql.close()
