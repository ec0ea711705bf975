"""End to end: a deliberately worse version is rolled back on a live agent, and the server's
REST API shows it, on the device and on the round.

Server and agent are separate processes on loopback; nothing is faked. The agent streams its
shard of digits (labelled, so it keeps them in its local dataset), installs version 0, then
the well-trained version of round 1 (probation: far better than v0, committed). Round 2 is
made bad on purpose: trained from fresh weights for one epoch at a learning rate too small to
move them, and shipped anyway (``skip_if_worse: false``). The agent installs it, scores it on
its own labelled inputs against round 1's model, rolls back, keeps serving round 1's model,
and never fetches round 2's again.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SAMPLES = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(fn, timeout: float, what: str, procs=()):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"process {p.args[:4]} exited with {p.returncode} while waiting for {what}"
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _agent_status(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture
def processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _round(api: httpx.Client, params: dict, procs) -> dict:
    r = api.post("/rounds", json={"method": "full", "cohort": {"all": True}, "params": params})
    assert r.status_code < 400, r.text
    round_id = r.json()["id"]
    report = _until(lambda: (rep := api.get(f"/rounds/{round_id}").json())["status"] in
                    ("done", "failed", "skipped") and rep, 120, f"round {params}", procs)
    assert report["status"] == "done", report["reason"]
    return report


def test_a_worse_version_is_rolled_back_and_shown_in_rest(tmp_path: Path, processes) -> None:
    python = [sys.executable, "-m", "edgeloop"]
    ready = tmp_path / "server.ready.json"
    server_env = {**os.environ, "EDGELOOP_MODEL_KIND": "mlp", "EDGELOOP_INPUT_SHAPE": "1,8,8",
                  "EDGELOOP_NUM_CLASSES": "10", "EDGELOOP_DRESS_SPARSITIES": "",
                  "EDGELOOP_HEARTBEAT_INTERVAL_S": "0.5", "EDGELOOP_FSYNC": "false"}
    server = subprocess.Popen(
        [*python, "server", "run", "--data-dir", str(tmp_path / "server"), "--rest-port", "0",
         "--grpc-port", "0", "--ready-file", str(ready)],
        env=server_env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    processes.append(server)
    _until(ready.exists, 60, "the server to start", [server])
    ports = json.loads(ready.read_text())

    status_port = _free_port()
    agent_env = {**os.environ, "EDGELOOP_AGENT_BATTERY": "false", "EDGELOOP_AGENT_LOAD_BUDGET": "false",
                 "EDGELOOP_AGENT_PROBATION_MARGIN": "0.05", "EDGELOOP_AGENT_PROBATION_MIN_SAMPLES": "50"}
    agent = subprocess.Popen(
        [*python, "agent", "run", "--server", f"127.0.0.1:{ports['grpc_port']}",
         "--data-dir", str(tmp_path / "agent"), "--name", "probe-0", "--dataset", "digits",
         "--max-samples", str(SAMPLES), "--rate-per-s", "0", "--status-port", str(status_port)],
        env=agent_env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    processes.append(agent)
    procs = [server, agent]

    with httpx.Client(base_url=f"http://127.0.0.1:{ports['rest_port']}/api/v1", timeout=30) as api:
        _until(lambda: api.get("/samples/counts").json()["labelled"] >= SAMPLES, 60,
               "the agent's labelled samples", procs)
        device_id = api.get("/devices").json()["data"][0]["id"]

        def device() -> dict:
            return api.get(f"/devices/{device_id}").json()

        good = _round(api, {"epochs": 30}, procs)
        view = _until(lambda: (d := device())["model_hash"] == good["model_hash"]
                      and d["update_state"] == "committed" and d, 60, "round 1's version committed", procs)
        assert view["rollbacks"] == []
        status = _agent_status(status_port)
        assert status["update"]["probation"]["samples"] >= 50
        good_acc = status["update"]["probation"]["new_accuracy"]
        assert good_acc > 0.6, status["update"]

        bad = _round(api, {"epochs": 1, "from_scratch": True, "lr": 1e-6, "seed": 5,
                           "skip_if_worse": False}, procs)
        assert bad["model_hash"] != good["model_hash"]
        view = _until(lambda: (d := device())["update_state"] == "rolled_back" and d, 60,
                      "the agent to roll round 2 back", procs)

        # The device: still on round 1's version, the rollback with its reason.
        assert view["model_hash"] == good["model_hash"] and not view["up_to_date"]
        assert view["target_model_hash"] == bad["model_hash"]
        [rollback] = view["rollbacks"]
        assert rollback["model_hash"] == bad["model_hash"]
        assert "below the previous model's" in rollback["reason"]
        # The round: who rolled its version back, and why.
        report = api.get(f"/rounds/{bad['id']}").json()
        assert report["devices_on_version"] == 0
        assert report["rollbacks"] == [{"device_id": device_id, "reason": rollback["reason"],
                                        "at_ms": rollback["at_ms"]}]
        assert api.get(f"/rounds/{good['id']}").json()["rollbacks"] == []

        # The agent keeps serving the old version and does not fetch the rejected one again.
        status = _agent_status(status_port)
        assert status["model_hash"] == good["model_hash"] and status["update_state"] == "rolled_back"
        assert status["update"]["probation"]["old_accuracy"] == pytest.approx(good_acc)
        fetched = status["metrics"]["bytes_downloaded"]
        for _ in range(2):  # two heartbeat intervals on, with the rejected version still named
            seen = device()["last_seen_at"]
            _until(lambda: device()["last_seen_at"] != seen, 10, "another heartbeat", procs)  # noqa: B023
        after = _agent_status(status_port)
        assert after["metrics"]["bytes_downloaded"] == fetched
        assert after["model_hash"] == good["model_hash"]
