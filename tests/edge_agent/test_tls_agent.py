"""The whole agent against a real TLS gRPC server (tests/server/grpc_fleet.py): pinning the wrong
CA, it reports the TLS error, keeps running its installed model and backs off; pinning the
right one (same data directory), it registers and comes online."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.daemon import Agent
from edge_agent.model_store import ModelStore
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource
from edge_agent.tls import PinnedCA, TLSSetupError
from server.tls import ensure_server_tls
from shared.models.identity import model_hash
from tests.server.grpc_fleet import Fleet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _agent(tmp_path, fleet: Fleet, ca_file) -> Agent:
    settings = AgentSettings(server=fleet.address, data_dir=tmp_path / "agent", ca_file=ca_file,
                             enrollment_token=fleet.enrollment_token, status_port=-1, battery=False,
                             load_budget=False, heartbeat_interval_s=0.2, backoff_initial_s=0.05,
                             backoff_max_s=0.5, upload_mode="none")
    source = DatasetShardSource(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), rate_per_s=1.0, seed=0)
    return Agent(settings, source=source)


def test_wrong_ca_is_reported_the_model_kept_and_the_right_ca_connects(server_ctx, tmp_path, tiny_arch,
                                                                       make_state, wait_until) -> None:
    fleet = Fleet(server_ctx)
    state = make_state(1)
    installed = model_hash(tiny_arch, state)
    ModelStore(tmp_path / "agent" / "models").install(tiny_arch, state, expected_hash=installed)
    other_ca = ensure_server_tls(tmp_path / "other", hostnames=["127.0.0.1"], cert_days=30).ca_file
    agent = _agent(tmp_path, fleet, other_ca)
    agent.start()
    try:
        wait_until(lambda: agent.conn.last_error.startswith("TLS"), 30, "the TLS error to be reported")
        status = agent.status()
        assert "CERTIFICATE_VERIFY_FAILED" in status["last_error"] and not status["connected"]
        assert agent.runner.model_hash == installed, "the running model must stay"
        assert not agent.conn.registered
    finally:
        agent.stop()
    agent = _agent(tmp_path, fleet, fleet.tls.ca_file)
    agent.start()
    try:
        wait_until(lambda: agent.conn.registered and agent.conn.connected, 30, "the agent to come online")
    finally:
        agent.stop()
        fleet.close()


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "leaf"])
def test_a_corrupt_stored_ca_stops_the_agent_instead_of_a_silent_refetch(tmp_path, corruption) -> None:
    tls = ensure_server_tls(tmp_path / "server", hostnames=["127.0.0.1"], cert_days=30)
    stored = tmp_path / "agent" / "tls" / "ca.crt"
    stored.parent.mkdir(parents=True)
    good = tls.ca_file.read_bytes()
    stored.write_bytes({"garbage": b"\x00\xffnot a certificate", "truncated": good[: len(good) // 2],
                        "leaf": tls.chain_pem.split(b"-----END CERTIFICATE-----")[0]
                        + b"-----END CERTIFICATE-----\n"}[corruption])
    before = stored.read_bytes()
    # Nothing listens on port 1: a re-fetch would fail differently (and later, not at start).
    settings = AgentSettings(server="127.0.0.1:1", data_dir=tmp_path / "agent", ca_fingerprint=tls.ca_fingerprint,
                             enrollment_token="elen_x_y", status_port=-1, battery=False, load_budget=False)
    source = DatasetShardSource(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), rate_per_s=1.0, seed=0)
    with pytest.raises(TLSSetupError, match=r"pinned CA is corrupt: .*ca\.crt.*delete .*ca\.crt"):
        Agent(settings, source=source)
    assert stored.read_bytes() == before, "the evidence must stay for the operator"
    stored.unlink()  # the documented way out: the next start fetches it by fingerprint
    assert PinnedCA.from_settings(settings) is not None
