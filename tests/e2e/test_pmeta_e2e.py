"""End to end: a live agent given a few-shot support set learns its classes with p-Meta.

Server and agent are separate processes on loopback, nothing faked. The server's fleet model is
a small 3-way conv4/pmeta model on 8x8 digits; a ``pmeta`` round meta-trains it on 3-way tasks
of the digits the agent uploads. The agent runs ``learner=pmeta`` with a
support set of digits 7, 8 and 9 in ``<data_dir>/few-shot`` plus one sample posted to its
local endpoint; it adapts on the committed version, serves the personal model, and its
heartbeat, seen through the REST device view, carries the few-shot accuracy and the measured
adaptation memory. The support samples never reach the server. The in-process sibling is
tests/edge_agent/test_pmeta_learner.py::test_a_live_agent_shows_its_personal_model_and_never_uploads_the_support_set.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.data import load_dataset
from shared.pmeta.spec import pmeta_spec
from shared.samples import encode_sample, sample_id

pytestmark = pytest.mark.slow  # two processes and a round: ~30-60 s on two shared cores

ARCH = pmeta_spec((1, 8, 8), 3, channels=8, blocks=3)
NEW = (7, 8, 9)


def test_a_support_set_on_a_live_agent_yields_a_personal_model_in_its_heartbeat(
        tmp_path, start_server, start_agent, agent_http, wait_until, free_port) -> None:
    digits = load_dataset("digits")
    # The agent streams train digits; its support set comes from the test split (pixel-identical
    # twins of streamed digits left out, so "never uploaded" is about the support set alone).
    streamed = {sample_id(encode_sample(x)) for x in digits.x_train}
    fresh = np.array([sample_id(encode_sample(x)) not in streamed for x in digits.x_test])
    support_ids = set()
    for c in NEW:
        folder = tmp_path / "fs-0" / "few-shot" / f"digit-{c}"
        folder.mkdir(parents=True)
        for i, x in enumerate(digits.x_test[(digits.y_test == c) & fresh][:4]):
            np.save(folder / f"{i}.npy", x, allow_pickle=False)
            support_ids.add(sample_id(encode_sample(x)))

    server = start_server(EDGELOOP_MODEL_ARCH_JSON=ARCH.to_json(), EDGELOOP_HEARTBEAT_INTERVAL_S="0.5")
    port = free_port
    agent = start_agent(server, "fs-0", samples=400, status_port=port, EDGELOOP_AGENT_LEARNER="pmeta",
                        EDGELOOP_AGENT_PROBATION_MARGIN="1",
                        EDGELOOP_AGENT_LEARNER_POLL_S="0.2")
    procs = [server.proc, agent]
    with server.api() as api:
        wait_until(lambda: api.get("/samples/counts").json()["labelled"] >= 300, 90, "uploads", procs)
        r = api.post("/rounds", json={"method": "pmeta", "cohort": {"all": True},
                                      "params": {"iterations": 10, "shots": 2, "queries": 3, "val_tasks": 10}})
        assert r.status_code < 400, r.text
        rid = r.json()["id"]
        report = wait_until(lambda: (rep := api.get(f"/rounds/{rid}").json())["status"]
                            in ("done", "failed", "skipped") and rep, 120, "the pmeta round", procs)
        assert report["status"] == "done", report["reason"]
        assert 0 <= report["metrics"]["few_shot_accuracy"] <= 1

        posted = digits.x_test[(digits.y_test == 9) & fresh][4]
        code, body = agent_http(port, "POST", "/few-shot", {"class": "digit-9", "input": posted.tolist()})
        assert code == 200 and body["shots"] == [4, 4, 5], body
        support_ids.add(sample_id(encode_sample(posted)))

        last: list[dict] = []

        def personal_on_round_version() -> dict | None:
            d = api.get("/devices").json()["data"][0]
            last[:] = [d]
            m = d["metrics"]
            return d if (d["model_hash"] == report["model_hash"] and m.get("learner_serving_personal") == 1.0
                         and m.get("learner_train_samples", 0) + m.get("learner_holdout_samples", 0) == 13) else None

        try:
            view = wait_until(personal_on_round_version, 60, "the personal model in a heartbeat", procs)
        except BaseException:
            print("last device view:", last, "agent status:", agent_http(port, "GET", "/status")[1].get("learner"))
            raise
        m = view["metrics"]
        assert 0 <= m["learner_personal_accuracy"] <= 1 and m["learner_saved_bytes"] > 0
        assert m["learner_seconds"] > 0
        _, status = agent_http(port, "GET", "/status")
        assert status["learner"]["state"] == "serving" and status["runner"]["personal_hash"]
        assert status["few_shot"]["classes"] == ["digit-7", "digit-8", "digit-9"]
        uploaded = set()
        offset = 0
        while True:
            page = api.get(f"/samples?limit=500&offset={offset}").json()
            uploaded |= {s["sample_id"] for s in page["data"]}
            offset += 500
            if offset >= page["count"]:
                break
        assert uploaded and not uploaded & support_ids
