"""The whole agent (supervisor + services) against a real gRPC server on loopback: it installs
the fleet's version, rolls back a worse one on its own labelled inputs, ignores that version
afterwards, takes the next one, re-registers when its credential is rejected, and restarts a
service loop that crashed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy import func, select

from edge_agent.daemon import Agent
from edge_agent.runner import ModelRunner
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource
from edge_agent.update_state import State
from server.db.engine import transaction
from server.db.models import Delivery, Device
from server.domain.devices import default_model_hash
from server.domain.versions import get_version, publish_version
from server.settings import ServerSettings
from shared.artefacts import decode_artefact
from shared.models import ArchSpec

ARCH = ArchSpec("mlp", (1, 28, 28), 10, hidden=(16,))
N_LOCAL = 120


@pytest.fixture
def server_settings(tmp_path):
    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'server.db'}",
                          model_arch_json=ARCH.to_json(), heartbeat_interval_s=0.2, watch_keepalive_s=0.2,
                          fsync=False)


def _version0(ctx) -> tuple[str, dict]:
    with transaction(ctx.factory) as s:
        h = default_model_hash(s)
        data = ctx.blobs.path(get_version(s, h).full_artefact_sha256).read_bytes()
    return h, decode_artefact(data).state


def _publish(ctx, state) -> str:
    with transaction(ctx.factory) as s:
        mv = publish_version(s, ctx.blobs, arch=ARCH, state=state, parent_hash=None, method="full",
                             metrics={}, fleet_default=True)
        for dev in s.scalars(select(Device)):
            dev.target_model_hash = mv.model_hash
    ctx.targets_changed.notify()
    return mv.model_hash


def _device_row(ctx) -> Device:
    with transaction(ctx.factory) as s:
        row = s.scalars(select(Device)).one()
        s.expunge(row)
        return row


def _agent(tmp_path, server, source=None, **kw) -> Agent:
    """An agent of ``server`` (a GrpcServer, presenting its enrollment token; or an address)."""
    address = server if isinstance(server, str) else server.address
    kw.setdefault("enrollment_token", getattr(server, "enrollment_token", ""))
    # insecure: the GrpcServer of tests/edge_agent/conftest.py is plaintext (TLS: tests/server/test_tls.py).
    settings = AgentSettings(server=address, data_dir=tmp_path / "agent", status_port=-1, battery=False, insecure=True,
                             load_budget=False, heartbeat_interval_s=0.2, backoff_initial_s=0.05,
                             backoff_max_s=0.5, upload_mode="none", **kw)
    if source is None:
        source = DatasetShardSource(np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.int64), rate_per_s=1.0, seed=0)
    return Agent(settings, source=source)


def test_rollback_on_a_live_agent_is_reported_and_not_retried(server, server_ctx, tmp_path, wait_until):
    v0, state0 = _version0(server_ctx)
    # The device's own labelled inputs: labelled as v0 labels them, so v0 scores 100 % there.
    x = np.random.default_rng(3).integers(0, 256, (N_LOCAL, 1, 28, 28), dtype=np.uint8)
    ref = ModelRunner()
    ref.load(ARCH, state0, v0)
    y = ref.predict(x)[0]
    agent = _agent(tmp_path, server, DatasetShardSource(x, y, rate_per_s=float("inf"), seed=0))
    agent.start()
    try:
        wait_until(lambda: agent.runner.model_hash == v0 and len(agent.local_data) >= N_LOCAL
               and agent.machine.state is State.COMMITTED, 30,
               "v0 installed and committed, and the local labels stored")

        worse = _publish(server_ctx, {k: v.clone().uniform_(-0.1, 0.1) for k, v in state0.items()})
        wait_until(lambda: agent.machine.state is State.ROLLED_BACK, 30, "the rollback")
        assert agent.runner.model_hash == v0 and agent.store.current_hash() == v0
        reason = agent.machine.rejected(worse).reason
        assert "below the previous model's" in reason
        assert agent.status()["update"]["rollbacks"][0]["model_hash"] == worse
        row = wait_until(lambda: (r := _device_row(server_ctx)).update_state == "rolled_back" and r, 10,
                     "the server to hear of it")
        assert row.model_hash == v0
        assert [(r["model_hash"], r["reason"]) for r in row.rollbacks] == [(worse, reason)]

        # Not retried: heartbeats go on, no second download of the rejected version.
        for _ in range(3):  # each heartbeat is a chance for the updater to (wrongly) retry
            seen = _device_row(server_ctx).last_seen_at
            wait_until(lambda seen=seen: _device_row(server_ctx).last_seen_at > seen, 10, "another heartbeat")
        with transaction(server_ctx.factory) as s:
            fetched = s.scalars(select(func.count()).select_from(Delivery)
                                .where(Delivery.final_model_hash == worse)).one()
        assert fetched == 1 and agent.machine.state is State.ROLLED_BACK

        # A different target is taken.
        better = _publish(server_ctx, {k: v * 1.0001 for k, v in state0.items()})
        wait_until(lambda: agent.runner.model_hash == better, 30, "the next version")
        wait_until(lambda: agent.machine.state is State.COMMITTED, 10, "its commit")
        assert agent.metrics()["recent_accuracy"] >= 0.95 and agent.metrics()["rollbacks"] == 1.0
        assert agent.status()["update_state"] == "committed"
        row = wait_until(lambda: (r := _device_row(server_ctx)).model_hash == better and r, 10, "the server")
        assert len(row.rollbacks) == 1  # a repeated report is not a new rollback
    finally:
        agent.stop()


def test_a_download_past_the_data_dir_budget_is_refused_and_reported(server, server_ctx, tmp_path,
                                                                      wait_until):
    """max_data_dir_bytes reaches the updater: with the queue's reserve and the local data
    counted, a 51 KB artefact does not fit 128 KiB, so the agent refuses it before writing a
    byte and says why in last_error and /status."""
    agent = _agent(tmp_path, server, queue_max_bytes=64 << 10, max_artefact_bytes=64 << 10,
                   max_data_dir_bytes=128 << 10)
    agent.start()
    try:
        wait_until(lambda: "max_data_dir_bytes" in agent.conn.last_error, 30, "the refusal")

        # The agent retries the update later (a budget may grow), so /status may show the next
        # attempt: wait for a state that reports the refusal, not for one instant.
        def refused() -> bool:
            status = agent.status()
            return (status["update_state"] == "failed"
                    and "max_data_dir_bytes=131072" in (status["update"] or {}).get("reason", ""))

        wait_until(refused, 30, "/status to report the refusal")
        assert agent.fetcher.stats.bytes_downloaded == 0 and not agent.runner.ready
        assert list((tmp_path / "agent" / "downloads").iterdir()) == []
    finally:
        agent.stop()


def test_a_rejected_credential_registers_again(server, server_ctx, tmp_path, wait_until):
    agent = _agent(tmp_path, server)
    agent.start()
    try:
        first = wait_until(lambda: agent.conn.identity, 20, "registration")
        with transaction(server_ctx.factory) as s:
            s.scalars(select(Device)).one().credential_hash = "0" * 64  # the server forgets it
        wait_until(lambda: agent.conn.identity is not None and agent.conn.identity.credential != first.credential,
               20, "a fresh credential")
        assert agent.conn.identity.device_id == first.device_id  # same hardware id, same device
    finally:
        agent.stop()


class Crashy:
    name = "crashy"

    def __init__(self) -> None:
        self.runs = 0
        self.second = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("boom")
        self.second.set()
        stop.wait()


def test_a_crashed_service_is_logged_and_restarted(tmp_path, caplog):
    agent = _agent(tmp_path, "127.0.0.1:9")  # nothing listens: offline the whole time
    crashy = Crashy()
    agent.services = [crashy]
    agent.start()
    try:
        assert crashy.second.wait(10)
        assert crashy.runs == 2
        assert any("crashy service crashed" in r.getMessage() for r in caplog.records)
    finally:
        agent.stop()


def test_the_learner_is_wired_when_configured(server, server_ctx, tmp_path, monkeypatch, wait_until):
    calls: list[str | None] = []
    agent = _agent(tmp_path, server, learner="head")
    assert agent.learner is not None
    real = agent.learner.base_changed
    monkeypatch.setattr(agent.learner, "base_changed", lambda h=None: (calls.append(h), real(h)))
    agent.start()
    try:
        v0, _ = _version0(server_ctx)
        wait_until(lambda: agent.machine.state is State.COMMITTED, 30, "v0 committed")
        wait_until(lambda: len(calls) == 2, 5, "base_changed after the commit")
        # Declared before the thread starts: nothing committed on a new device, then v0.
        assert calls == ["", v0]
        status = agent.status()
        assert status["learner"]["learner"] == "head"
        assert any(k.startswith("learner_") for k in agent.metrics())
    finally:
        agent.stop()
    assert agent.learner._thread is None  # stopped with the agent
