"""The agent honours the server's rate limit (issue 9 item 6): a RESOURCE_EXHAUSTED carries a
retry-after-ms hint, and no call leaves the agent before it has passed. Real gRPC servers on
loopback ports; clocks are injected where a test steps time, and the live-agent test checks
the send times it observes against the hints it received."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from edge_agent.backoff import MAX_RETRY_AFTER_S, Backoff, RetryAfter, retry_after_s
from edge_agent.client import FleetClient, TransientError
from edge_agent.daemon import Agent
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource
from protos.edgeloop.v1 import fleet_pb2 as pb
from server.grpc_api.aio_server import AgentGrpcServer
from server.grpc_api.ratelimit import RateLimiter
from server.grpc_api.servicer import RETRY_AFTER_KEY
from server.settings import ServerSettings
from shared.models import ArchSpec
from tests.server.grpc_fleet import create_enrollment_token, harness_settings

ARCH = ArchSpec("mlp", (1, 28, 28), 10, hidden=(16,))


@pytest.fixture
def server_settings(tmp_path):
    """Overrides tests/conftest.py: agent behaviour, one database kind is enough."""
    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'server.db'}",
                          model_arch_json=ARCH.to_json(), heartbeat_interval_s=0.5, watch_keepalive_s=0.5,
                          fsync=False)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class CountingLimiter(RateLimiter):
    """The servicer's real limiter, counting the calls that reached it."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls = 0

    def try_acquire(self, key: str) -> float:
        self.calls += 1
        return super().try_acquire(key)


@pytest.fixture
def limited_server(server_ctx):
    """``start(limiter)``: the agent server with ``limiter`` as its per-device limit on a
    loopback port; returns its address."""
    servers = []

    def start(limiter: RateLimiter) -> str:
        server = AgentGrpcServer(server_ctx, harness_settings(server_ctx.settings, {}))
        server.servicer.device_limits = limiter
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_retry_after_hint_parsing():
    assert retry_after_s([("other", "1"), (RETRY_AFTER_KEY, "1500")]) == 1.5
    assert retry_after_s(None) == 0.0 and retry_after_s([]) == 0.0
    assert retry_after_s([(RETRY_AFTER_KEY, "soon")]) == 0.0 and retry_after_s([(RETRY_AFTER_KEY, "-5")]) == 0.0
    assert retry_after_s([(RETRY_AFTER_KEY, str(10**12))]) == MAX_RETRY_AFTER_S  # a broken server cannot park us


def test_backoff_never_waits_less_than_the_hint():
    b = Backoff(0.01, 0.02, jitter="none")
    assert b.next_delay(TransientError("x", retry_after_s=3.0)) == 3.0
    assert b.next_delay(TransientError("x")) == 0.02 and b.next_delay(None) == 0.02
    gate = RetryAfter(clock=(clock := Clock()))
    gate.hold(2.0)
    gate.hold(1.0)  # an earlier hint does not shorten a later one
    clock.now += 1.5
    assert gate.remaining() == pytest.approx(0.5)
    clock.now += 1
    assert gate.remaining() == 0.0


def test_client_holds_every_call_until_the_hint_has_passed(limited_server, server_ctx):
    server_clock, client_clock = Clock(), Clock()
    limiter = CountingLimiter(1.0, 1, clock=server_clock)
    client = FleetClient(limited_server(limiter), timeout_s=10)
    client.retry_after = RetryAfter(clock=client_clock)
    try:
        reg = client.register(enrollment_token=create_enrollment_token(server_ctx), hardware_id="hw",
                              name="", tags=[], agent_version="t")
        client.credential = reg.device_credential
        client.heartbeat(pb.HeartbeatRequest())
        with pytest.raises(TransientError) as err:
            client.heartbeat(pb.HeartbeatRequest())
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_s == 1.0
        reached = limiter.calls
        client_clock.now += 0.999
        for call in (lambda: client.heartbeat(pb.HeartbeatRequest()), lambda: client.upload([]),
                     lambda: list(client.get_update(pb.GetUpdateRequest())), lambda: list(client.watch(""))):
            with pytest.raises(TransientError, match="holding off") as err:
                call()
            assert err.value.retry_after_s == pytest.approx(0.001)
        assert limiter.calls == reached  # none of them reached the server
        client_clock.now += 0.002
        server_clock.now += 1.0
        client.heartbeat(pb.HeartbeatRequest())
        assert limiter.calls == reached + 1
    finally:
        client.close()


def test_live_agent_does_not_heartbeat_before_the_hint(limited_server, server_ctx, tmp_path):
    """Heartbeats every 20 ms against 2 calls/s: each refused heartbeat's successor is sent no
    earlier than its hint (without the hint the backoff alone would retry within 50 ms)."""
    address = limited_server(RateLimiter(2.0, 4))
    settings = AgentSettings(server=address, data_dir=tmp_path / "agent", status_port=-1, battery=False,
                             insecure=True, load_budget=False, heartbeat_interval_s=0.02, backoff_initial_s=0.01,
                             backoff_max_s=0.05, upload_mode="none",
                             enrollment_token=create_enrollment_token(server_ctx))
    agent = Agent(settings, DatasetShardSource(np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.int64),
                                               rate_per_s=1.0, seed=0))
    sends: list[float] = []
    refusals: list[tuple[float, float]] = []  # (received at, hint s)
    enough = threading.Event()
    stub = agent.conn.client._stub
    real = stub.Heartbeat

    def heartbeat(*args, **kw):
        sends.append(time.monotonic())
        try:
            return real(*args, **kw)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refusals.append((time.monotonic(), retry_after_s(exc.trailing_metadata())))
                if len(refusals) >= 4:
                    enough.set()
            raise

    stub.Heartbeat = heartbeat
    agent.start()
    try:
        assert enough.wait(30), f"only {len(refusals)} refusals in 30 s"
        sent_after = list(sends)
    finally:
        agent.stop()
    checked = 0
    for received, hint in refusals[:-1]:
        assert hint > 0.1
        later = [t for t in sent_after if t > received]
        assert later, "no heartbeat after a refusal"
        assert later[0] >= received + hint, f"heartbeat {later[0] - received:.3f} s after a {hint:.3f} s hint"
        checked += 1
    assert checked >= 3


def test_agent_reports_a_refused_registration_then_takes_the_token_file(limited_server, server_ctx, tmp_path,
                                                                         wait_until):
    """A wrong token is reported (not retried silently); a token file written later is read at
    the next attempt, and the device registers."""
    address = limited_server(RateLimiter(0, 1))
    token_file = tmp_path / "enrollment-token"
    token_file.write_text("elen_0123456789abcdef_" + "A" * 43 + "\n")
    settings = AgentSettings(server=address, data_dir=tmp_path / "agent", status_port=-1, battery=False,
                             insecure=True, load_budget=False, heartbeat_interval_s=0.05, backoff_initial_s=0.01,
                             backoff_max_s=0.05, upload_mode="none", enrollment_token_file=token_file)
    agent = Agent(settings, DatasetShardSource(np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.int64),
                                               rate_per_s=1.0, seed=0))
    agent.start()
    try:
        wait_until(lambda: "registration refused" in agent.conn.last_error, 20, "the refusal to be reported")
        assert "invalid enrollment token" in agent.conn.last_error and not agent.conn.registered
        token_file.write_text(create_enrollment_token(server_ctx) + "\n")
        wait_until(lambda: agent.conn.registered, 20, "the registration with the new token")
    finally:
        agent.stop()
