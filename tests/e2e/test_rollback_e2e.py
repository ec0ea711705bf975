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

import pytest

SAMPLES = 300


def test_a_worse_version_is_rolled_back_and_shown_in_rest(
    start_server, start_agent, agent_http, wait_until, free_port
) -> None:
    server = start_server(EDGELOOP_HEARTBEAT_INTERVAL_S="0.5")
    status_port = free_port
    agent = start_agent(server, "probe-0", samples=SAMPLES, status_port=status_port,
                        EDGELOOP_AGENT_PROBATION_MARGIN="0.05",
                        EDGELOOP_AGENT_PROBATION_MIN_SAMPLES="50")
    procs = [server.proc, agent]

    def agent_status() -> dict:
        code, body = agent_http(status_port, "GET", "/status")
        assert code == 200, body
        return body

    with server.api() as api:
        def run_round(params: dict) -> dict:
            r = api.post("/rounds", json={"method": "full", "cohort": {"all": True}, "params": params})
            assert r.status_code < 400, r.text
            round_id = r.json()["id"]
            report = wait_until(lambda: (rep := api.get(f"/rounds/{round_id}").json())["status"]
                                in ("done", "failed", "skipped") and rep, 120, f"round {params}",
                                procs)
            assert report["status"] == "done", report["reason"]
            return report

        wait_until(lambda: api.get("/samples/counts").json()["labelled"] >= SAMPLES, 60,
                   "the agent's labelled samples", procs)
        device_id = api.get("/devices").json()["data"][0]["id"]

        def device() -> dict:
            return api.get(f"/devices/{device_id}").json()

        good = run_round({"epochs": 30})
        view = wait_until(lambda: (d := device())["model_hash"] == good["model_hash"]
                          and d["update_state"] == "committed" and d, 60,
                          "round 1's version committed", procs)
        assert view["rollbacks"] == []
        status = agent_status()
        assert status["update"]["probation"]["samples"] >= 50
        good_acc = status["update"]["probation"]["new_accuracy"]
        assert good_acc > 0.6, status["update"]

        bad = run_round({"epochs": 1, "from_scratch": True, "lr": 1e-6, "seed": 5,
                         "skip_if_worse": False})
        assert bad["model_hash"] != good["model_hash"]
        view = wait_until(lambda: (d := device())["update_state"] == "rolled_back" and d, 60,
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
        status = agent_status()
        assert status["model_hash"] == good["model_hash"] and status["update_state"] == "rolled_back"
        assert status["update"]["probation"]["old_accuracy"] == pytest.approx(good_acc)
        fetched = status["metrics"]["bytes_downloaded"]
        for _ in range(2):  # two heartbeat intervals on, with the rejected version still named
            seen = device()["last_seen_at"]
            wait_until(lambda: device()["last_seen_at"] != seen, 10, "another heartbeat", procs)  # noqa: B023
        after = agent_status()
        assert after["metrics"]["bytes_downloaded"] == fetched
        assert after["model_hash"] == good["model_hash"]
