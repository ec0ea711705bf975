"""End to end: a live agent of a tagged cohort receives its DA³ adaptor, and only the adaptor.

Server and agents are separate processes on loopback, nothing faked. The fleet model is a
small resnet on 8x8 digits; a ``full`` round pre-trains it for everyone, then a ``da3`` round
for the tag ``site-night`` adapts it for that cohort. The tagged agent downloads the signed
``da3/adaptor-v1`` artefact (its byte counter grows by exactly the adaptor's size, far below the
model's) and runs the adapted model; the untagged agent stays on the backbone. The in-process
sibling is tests/server/test_da3_round.py::test_da3_round_ships_only_the_adaptor_to_its_cohort.
"""

from __future__ import annotations

import pytest

from shared.models import ArchSpec

pytestmark = pytest.mark.slow  # two agents, a server and two rounds: ~30-60 s on two cores

BACKBONE = ArchSpec(kind="resnet", input_shape=(1, 8, 8), num_classes=10, hidden=(1, 1), channels=(8, 16))


def test_a_cohort_agent_receives_only_its_adaptor(start_server, start_agent, agent_http, wait_until,
                                                   free_port) -> None:
    server = start_server(EDGELOOP_MODEL_ARCH_JSON=BACKBONE.to_json(), EDGELOOP_HEARTBEAT_INTERVAL_S="0.5")
    night_port = free_port
    env = {"EDGELOOP_AGENT_PROBATION_MARGIN": "1"}  # the test is delivery, not probation
    night = start_agent(server, "night", samples=300, status_port=night_port,
                        EDGELOOP_AGENT_TAGS="site-night", EDGELOOP_AGENT_LEARNER="da3",
                        EDGELOOP_AGENT_LEARNER_MIN_SAMPLES="100", EDGELOOP_AGENT_LEARNER_EPOCHS="2",
                        EDGELOOP_AGENT_LEARNER_RETRAIN_EVERY="0", EDGELOOP_AGENT_LEARNER_POLL_S="0.2", **env)
    day = start_agent(server, "day", samples=300, status_port=-1, **env)
    procs = [server.proc, night, day]
    with server.api() as api:
        def devices() -> dict:
            return {d["name"]: d for d in api.get("/devices").json()["data"]}

        def run(body: dict) -> dict:
            r = api.post("/rounds", json=body)
            assert r.status_code < 400, r.text
            rid = r.json()["id"]
            rep = wait_until(lambda: (x := api.get(f"/rounds/{rid}").json())["status"]
                             in ("done", "failed", "skipped") and x, 120, f"the {body['method']} round", procs)
            assert rep["status"] == "done", rep["reason"]
            return rep

        wait_until(lambda: api.get("/samples/counts").json()["labelled"] >= 500, 90, "uploads", procs)
        pre = run({"method": "full", "cohort": {"all": True}, "params": {"epochs": 4, "skip_if_worse": False}})
        wait_until(lambda: all(d["model_hash"] == pre["model_hash"] for d in devices().values())
                   and len(devices()) == 2, 90, "both agents on the backbone", procs)
        before = devices()["night"]["metrics"]["bytes_downloaded"]
        adapt = run({"method": "da3", "cohort": {"tag": "site-night"},
                     "params": {"epochs": 2, "skip_if_worse": False}})
        wait_until(lambda: devices()["night"]["model_hash"] == adapt["model_hash"], 90,
                   "the night agent on its adaptor", procs)
        m = adapt["metrics"]
        wait_until(lambda: devices()["night"]["metrics"]["bytes_downloaded"] > before, 30,
                   "a heartbeat after the install", procs)
        got = devices()["night"]["metrics"]["bytes_downloaded"] - before
        assert got == m["diff_bytes"] == m["adaptor_bytes"] and got * 2 < m["full_model_bytes"]
        assert devices()["day"]["model_hash"] == pre["model_hash"]  # not its cohort
        _, status = agent_http(night_port, "GET", "/status")
        assert status["runner"]["model_hash"] == adapt["model_hash"]

        # On the device: the da3 learner adapts the shipped model to its own data, per domain.
        def learner() -> dict:
            return agent_http(night_port, "GET", "/status")[1]["learner"]

        def settled_on(base: str) -> dict | None:
            st = learner()
            return st if st.get("base_hash") == base and st["state"] in ("serving", "base_better") else None

        first = wait_until(lambda: settled_on(adapt["model_hash"]), 90, "a local adaptation", procs)
        code, view = agent_http(night_port, "PUT", "/domain", {"domain": "indoor"})
        assert code == 200 and (view["active"], view["source"]) == ("indoor", "operator"), view
        wait_until(lambda: learner()["derivations"] > first["derivations"], 90, "adapting for 'indoor'", procs)
        code, view = agent_http(night_port, "PUT", "/domain", {"domain": None})
        assert code == 200 and view["active"] == "default" and view["switches"] == 2
        back = wait_until(lambda: (st := learner())["loaded"] + st["derivations"] > first["derivations"] + 1
                          and st, 90, "back to 'default'", procs)
        assert back["state"] in ("serving", "base_better")
        assert agent_http(night_port, "PUT", "/domain", {"domain": "Bad/Name"})[0] == 400
        m = wait_until(lambda: (d := devices()["night"]["metrics"]).get("learner_domain_switches") == 2 and d,
                       30, "the switches in a heartbeat", procs)
        assert m["learner_domains_stored"] >= 0 and 0 <= m["learner_base_accuracy"] <= 1
