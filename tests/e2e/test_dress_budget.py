"""End to end: a DRESS fleet model trained in a real round, run by a real agent process whose
subnet follows a budget PUT on its status endpoint, as the server's device API shows.

Server (EDGELOOP_DRESS_SPARSITIES) and agent are separate processes on loopback; nothing is
faked. The agent starts on the untrained version 0 (dense, active subnet -1), receives the
DRESS-trained version 1, profiles its subnets, runs the densest (no budget), and switches to
the sparse subnet a tight energy budget allows.
"""

from __future__ import annotations

import time

import pytest

SPARSITIES = "0.5,0.8,0.9,0.95"
SAMPLES = 400


def test_budget_put_switches_the_subnet_the_server_sees(
    start_server, start_agent, agent_http, wait_until, free_port
) -> None:
    server = start_server(EDGELOOP_DRESS_SPARSITIES=SPARSITIES, EDGELOOP_HEARTBEAT_INTERVAL_S="1")
    status_port = free_port
    agent = start_agent(server, "dress-0", samples=SAMPLES, status_port=status_port,
                        EDGELOOP_AGENT_GOVERNOR_INTERVAL_S="0.2", EDGELOOP_AGENT_PROFILE_REPS="20")
    procs = [server.proc, agent]

    with server.api() as api:
        wait_until(lambda: api.get("/samples/counts").json()["labelled"] >= SAMPLES, 60,
                   "the agent's labelled samples", procs)
        device = api.get("/devices").json()["data"][0]
        assert device["active_subnet"] == -1  # version 0 is not DRESS-trained: dense
        device_id = device["id"]

        r = api.post("/rounds", json={"method": "dpu", "cohort": {"all": True},
                                      "params": {"epochs": 2, "batch_size": 64}})
        assert r.status_code < 400, r.text
        round_id = r.json()["id"]
        report = wait_until(lambda: (lambda rep: rep if rep["status"] in ("done", "failed", "skipped")
                                     else None)(api.get(f"/rounds/{round_id}").json()),
                            90, "the DRESS round", procs)
        assert report["status"] == "done", report.get("reason")
        assert len(report["metrics"]["subnet_val_accuracy"]) == 4

        def device_view() -> dict:
            return api.get(f"/devices/{device_id}").json()

        # Version 1 installed and profiled with the accuracies the server reported: no budget,
        # so the most accurate subnet runs (the densest among equals).
        accs = report["metrics"]["subnet_val_accuracy"]
        best = max(range(len(accs)), key=lambda k: (accs[k], -k))
        wait_until(lambda: (d := device_view())["model_hash"] == report["model_hash"]
                   and d["active_subnet"] == best, 30, f"the agent on subnet {best} of version 1", procs)

        code, status = agent_http(status_port, "GET", "/status")
        assert code == 200 and status["model_hash"] == report["model_hash"]
        energies = [p["energy_mj"] for p in status["profiles"]]
        assert len(energies) == 4
        assert all(a > b for a, b in zip(energies, energies[1:], strict=False))
        limit = (energies[2] + energies[3]) / 2  # only the 95 %-sparse subnet fits

        code, body = agent_http(status_port, "PUT", "/budget", {"energy_mj": limit})
        assert code == 200 and body["energy_mj"] == pytest.approx(limit)
        t0 = time.monotonic()
        view = wait_until(lambda: (d := device_view())["active_subnet"] == 3 and d, 10,
                          "the server to see subnet 3", procs)
        waited = time.monotonic() - t0
        assert view["budget"]["energy_mj"] == pytest.approx(limit)
        assert view["metrics"]["budget_fits"] == 1.0
        assert view["metrics"]["energy_budget_mj"] == pytest.approx(limit)
        assert view["metrics"]["active_energy_mj"] <= limit
        print(f"server saw subnet 3 {waited:.2f} s after PUT /budget")
