"""The agent daemon with a real DRESS model and the budget governor wired in: a static energy
budget selects the expected subnet, PUT /budget on the real status endpoint switches it, the
inference loop feeds batch-1 latencies to the governor. No server: the agent runs offline."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from edge_agent.daemon import Agent
from edge_agent.model_store import ModelStore
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource
from shared.models import model_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(tmp_path: Path, digits, arch=None, state=None, **overrides) -> Agent:
    if state is not None:
        ModelStore(tmp_path / "models").install(arch, state, expected_hash=model_hash(arch, state))
    settings = AgentSettings(**{
        "server": f"127.0.0.1:{_free_port()}", "data_dir": tmp_path, "status_port": 0, "insecure": True,
        "battery": False, "load_budget": False, "governor_interval_s": 0.05,
        "governor_min_dwell_s": 0.0, "profile_reps": 10, "backoff_initial_s": 5.0, **overrides})
    source = DatasetShardSource(digits.x_test, digits.y_test, rate_per_s=500, seed=0, loop=True)
    return Agent(settings, source=source)


def _put(agent: Agent, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.status_server.port, timeout=10)
    try:
        conn.request("PUT", "/budget", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _status(agent: Agent) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", agent.status_server.port, timeout=10)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


# Condition waits, not timings: generous, so a loaded CI machine cannot fail them.
WAIT_S = 60.0


def _wait(cond, timeout: float) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def _densest_fitting(energies: list[float], limit: float) -> int:
    fitting = [k for k, e in enumerate(energies) if e <= limit]
    return min(fitting) if fitting else len(energies) - 1  # none fits: the cheapest


def test_static_energy_budget_then_put_budget_switches(tmp_path, dress_model):
    e = dress_model["energies"]
    assert all(a > b for a, b in zip(e, e[1:], strict=False))
    static = (e[0] + e[1]) / 2  # subnet 0 does not fit, subnet 1 does
    # No periodic re-check (interval an hour): each switch below proves a PUT woke the governor.
    agent = _agent(tmp_path, dress_model["ds"], dress_model["arch"], dress_model["state"],
                   budget_energy_mj=static, governor_interval_s=3600.0)
    agent.start()
    try:
        # The service applies a decision before it counts as governed (no race with the runner).
        _wait(lambda: agent.governor.governed is not None, WAIT_S)
        assert agent.runner.active_subnet == _densest_fitting(e, static) == 1
        status = _status(agent)
        assert status["runner"]["active_subnet"] == 1
        assert status["budget"]["energy_mj"] == pytest.approx(static)
        assert [p["index"] for p in status["profiles"]] == [0, 1, 2, 3]
        assert status["governor"]["decision"]["subnet"] == 1
        assert status["governor"]["sources"]["config"]["energy_mj"] == pytest.approx(static)

        # Tighter than every subnet: the cheapest runs, counted as a budget miss.
        code, body = _put(agent, {"energy_mj": e[-1] / 2})
        assert code == 200 and body["energy_mj"] == pytest.approx(e[-1] / 2)
        _wait(lambda: agent.runner.active_subnet == 3, WAIT_S)
        assert agent.metrics()["budget_fits"] == 0.0

        # Between subnets 1 and 2, with room for the 10 % up-switch margin.
        limit = (e[1] + e[2]) / 2
        assert e[2] <= limit * 0.9
        code, _ = _put(agent, {"energy_mj": limit})
        assert code == 200
        _wait(lambda: agent.runner.active_subnet == _densest_fitting(e, limit) == 2, WAIT_S)

        # Clearing the HTTP limit leaves the static one in force.
        _put(agent, {"energy_mj": None})
        _wait(lambda: agent.runner.active_subnet == 1, WAIT_S)

        code, body = _put(agent, {"energy_mj": -1})
        assert code == 400 and "energy_mj" in body["error"]
        assert agent.runner.active_subnet == 1

        # The inference loop runs batch-1 calls on the active subnet and reports their latency.
        _wait(lambda: agent.predictions.summary().get("count", 0) >= 50, WAIT_S)
        m = agent.metrics()
        assert m["active_subnet"] == 1.0 and m["energy_budget_mj"] == pytest.approx(static)
        assert m["switches"] >= 3 and m["latency_drift"] != 1.0 and m["latency_drift"] > 0
        assert m["active_energy_mj"] == pytest.approx(e[1])
    finally:
        agent.stop()


def test_memory_budget_from_file(tmp_path, dress_model):
    budget_file = tmp_path / "budget.json"
    agent = _agent(tmp_path / "agent", dress_model["ds"], dress_model["arch"], dress_model["state"],
                   budget_file=budget_file)
    agent.start()
    try:
        _wait(lambda: agent.governor.governed is not None, WAIT_S)
        assert agent.runner.active_subnet == 0  # no budget: the densest
        memory = [p.peak_memory_mb for p in agent.governor.governed.profiles]
        tmp = budget_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"memory_mb": (memory[2] + memory[3]) / 2}))
        tmp.replace(budget_file)
        _wait(lambda: agent.runner.active_subnet == 3, WAIT_S)
    finally:
        agent.stop()


def test_plain_model_keeps_its_behaviour(tmp_path, digits, tiny_arch, make_state):
    agent = _agent(tmp_path, digits, tiny_arch, make_state(1))
    agent.start()
    try:
        _wait(lambda: agent.predictions.summary().get("count", 0) >= 64, WAIT_S)
        assert agent.governor.governed is None and agent.runner.active_subnet == -1
        code, body = _put(agent, {"latency_ms": 5})
        assert code == 200 and body["latency_ms"] == 5.0
        status = _status(agent)
        assert status["governor"] is None and status["profiles"] == []
        assert status["budget"]["latency_ms"] == 5.0  # reported even with nothing to govern
        assert agent.metrics()["active_subnet"] == -1.0
    finally:
        agent.stop()


def test_the_heartbeat_after_an_update_carries_the_new_models_governor_metrics(
    tmp_path, dress_model, monkeypatch
):
    """An update outcome wakes the reporter only once the governor has profiled the model now
    running (on its own thread, once), so the server's first view of it is governed."""
    from edge_agent.services import governor_service
    from edge_agent.update_state import State, UpdateRecord

    profiled: list[str] = []
    real_profile = governor_service.profile_subnets

    def counting_profile(runner, *a, **kw):
        profiled.append(runner.model_hash)
        return real_profile(runner, *a, **kw)

    monkeypatch.setattr(governor_service, "profile_subnets", counting_profile)
    e = dress_model["energies"]
    agent = _agent(tmp_path, dress_model["ds"], dress_model["arch"], dress_model["state"],
                   budget_energy_mj=(e[0] + e[1]) / 2, governor_interval_s=3600.0)
    agent.start()
    try:
        _wait(lambda: agent.governor.governed is not None, WAIT_S)
        # A new DRESS version starts serving (as the update machine's install does) and commits.
        new_state = {k: v * 1.001 if v.is_floating_point() and k.endswith("weight") else v
                     for k, v in dress_model["state"].items()}
        new_hash = model_hash(dress_model["arch"], new_state)
        agent.runner.load(dress_model["arch"], new_state, new_hash)
        seen: list[tuple[str, dict]] = []
        woken = threading.Event()
        agent.reporter.wake = lambda: (seen.append((agent.runner.model_hash, agent.metrics())),
                                       woken.set())
        agent.machine.on_outcome(UpdateRecord(state=State.COMMITTED, target_hash=new_hash))
        assert woken.wait(20), "the reporter was never woken"
        [(running, metrics)] = seen
        assert running == new_hash == agent.governor.governed_hash
        assert {"budget_hits", "budget_misses", "budget_fits"} <= metrics.keys()
        assert metrics["active_subnet"] == 1.0  # the subnet the budget allows
        assert profiled == [dress_model["hash"], new_hash]  # each model profiled once
    finally:
        agent.stop()
