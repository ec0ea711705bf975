"""REST API: devices, samples, models, auth, limits, health and OpenAPI, on SQLite and
PostgreSQL (the ``server_ctx`` fixture runs each test on both)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from server.api.main import MAX_BODY_BYTES, create_app
from server.api.routes.health import metrics_registry
from server.context import ServerContext
from server.db.engine import transaction
from server.db.models import Device, OperatorToken, Sample
from server.domain import devices as D
from server.domain.errors import UnauthenticatedError
from server.domain.operators import read_bootstrap_token
from server.domain.samples import SampleIn, ingest_samples
from shared.artefacts import FULL_MODEL_ENCODING, decode_artefact
from shared.samples import encode_sample, sample_id

with warnings.catch_warnings():  # starlette warns that its TestClient prefers httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "operator-secret-token"


# --- helpers (also used by test_rest_rounds.py) --------------------------------------------


def make_client(ctx: ServerContext, *, auth: bool = True) -> TestClient:
    """A client of a fresh app over ``ctx``, sending the first-start admin token if ``auth``."""
    app = create_app(ctx)
    headers = {"Authorization": f"Bearer {read_bootstrap_token(ctx.settings.data_dir)}"} if auth else {}
    return TestClient(app, raise_server_exceptions=True, headers=headers)


def register(ctx: ServerContext, hardware_id: str, tags: list[str] | None = None) -> D.Registration:
    with transaction(ctx.factory) as s:
        return D.register_device(
            s, hardware_id=hardware_id, tags=tags or [], hardware={"cpu": "cortex-a72", "ram_mb": "4096"},
            agent_version="0.1.0",
        )


def ingest(ctx: ServerContext, device_id: str, xs: np.ndarray, labels: list[int | None]) -> list[str]:
    """Store samples for a device through the same domain call the gRPC upload uses."""
    items = []
    for x, y in zip(xs, labels, strict=True):
        payload = encode_sample(np.ascontiguousarray(x, dtype=np.uint8))
        items.append(SampleIn(sample_id(payload), payload, y, {"source": "test"}))
    with transaction(ctx.factory) as s:
        device = s.get(Device, device_id)
        result = ingest_samples(s, ctx.blobs, device, items, arch=ctx.settings.arch,
                                max_bytes=ctx.settings.max_sample_bytes)
    assert not result.rejected, result.rejected
    return [it.sample_id for it in items]


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)


def labels_in_db(ctx: ServerContext) -> dict[tuple[str, str], int | None]:
    with ctx.factory() as s:
        return {(r.device_id, r.sample_id): r.label for r in s.scalars(select(Sample))}


# --- health, metrics -----------------------------------------------------------------------


def _metrics(client: TestClient) -> dict[str, float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_healthz_and_metrics_reflect_the_fleet(server_ctx, client):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    m = _metrics(client)
    assert m["edgeloop_devices"] == 0 and m["edgeloop_model_versions"] == 1
    assert m["edgeloop_database_up"] == 1

    a = register(server_ctx, "hw-a")
    b = register(server_ctx, "hw-b")
    ingest(server_ctx, a.device.id, random_images(5, 0), [1, 2, None, None, None])
    with transaction(server_ctx.factory) as s:  # b was last seen long ago: offline
        s.get(Device, b.device.id).last_seen_at = s.get(Device, b.device.id).created_at.replace(year=2000)
    client.post("/api/v1/rounds", json={"cohort": {"all": True}})
    m = _metrics(client)
    assert m["edgeloop_devices"] == 2
    assert m["edgeloop_devices_online"] == 1
    assert m["edgeloop_samples{labelled=true}"] == 2
    assert m["edgeloop_samples{labelled=false}"] == 3
    assert m["edgeloop_rounds{status=queued}"] == 1
    assert m["edgeloop_rounds{status=done}"] == 0


def _client_losing_its_database(server_ctx: ServerContext, broken: ServerContext) -> TestClient:
    """A client of an app that started on ``server_ctx`` (first-start token and all) and then
    lost its database (``broken``)."""
    c = make_client(server_ctx)
    c.app.state.ctx = broken
    c.app.state.metrics_registry = metrics_registry(broken)
    return c


def test_healthz_is_503_when_the_database_is_unreachable(server_ctx, tmp_path):
    # SQLite cannot create a file in a directory that does not exist: every connect fails.
    broken = dataclasses.replace(server_ctx, engine=create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
    c = _client_losing_its_database(server_ctx, broken)
    resp = c.get("/healthz")
    assert resp.status_code == 503
    assert resp.json()["database"] == "unreachable"
    broken_factory = dataclasses.replace(broken, factory=type(server_ctx.factory)(broken.engine))
    # The token check needs the database too: an authenticated scrape is a 503...
    resp = _client_losing_its_database(server_ctx, broken_factory).get("/metrics")
    assert resp.status_code == 503 and resp.json() == {"detail": "database unreachable"}
    # ...and a public /metrics still answers, reporting the database as down.
    public = dataclasses.replace(broken_factory, settings=server_ctx.settings.model_copy(update={"metrics_public": True}))
    assert "edgeloop_database_up 0.0" in _client_losing_its_database(server_ctx, public).get("/metrics").text
    # A mutating call is refused before anything runs: its audit record cannot be written.
    resp = _client_losing_its_database(server_ctx, broken_factory).post("/api/v1/rounds", json={"cohort": {"all": True}})
    assert resp.status_code == 503 and "nothing was changed" in resp.json()["detail"]


# --- auth, limits, malformed requests ------------------------------------------------------


def _api_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) under /api/v1, from the OpenAPI document, path params filled."""
    spec = client.get("/openapi.json").json()
    return [
        (method.upper(), path.replace("{", "").replace("}", ""))
        for path, item in spec["paths"].items() if path.startswith("/api/v1")
        for method in item
    ]


def test_every_api_route_refuses_a_missing_or_wrong_token(server_ctx):
    c = make_client(server_ctx, auth=False)
    routes = _api_routes(c)
    assert len(routes) >= 18
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
            resp = c.request(method, path, headers=headers, json={})
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["detail"] in ("invalid operator token",
                                             "missing operator token (header 'Authorization: Bearer <token>')")
            assert resp.headers["www-authenticate"] == "Bearer"
    # Only /healthz and the API's own description are open; /metrics needs a token by default.
    for open_path in ("/healthz", "/openapi.json", "/docs"):
        assert c.get(open_path).status_code == 200, open_path
    assert c.get("/metrics").status_code == 401


def test_the_provisioned_operator_token_is_an_admin_token_stored_hashed(server_ctx):
    ctx = dataclasses.replace(server_ctx, settings=server_ctx.settings.model_copy(update={"operator_token": TOKEN}))
    c = make_client(ctx, auth=False)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/v1/devices", headers=ok).status_code == 200
    assert c.get("/api/v1/devices/nope", headers=ok).status_code == 404
    listed = {t["id"]: t for t in c.get("/api/v1/tokens", headers=ok).json()["data"]}
    assert listed["env"]["name"] == "env-admin" and listed["env"]["scope"] == "admin"
    with ctx.factory() as s:
        assert s.get(OperatorToken, "env").secret_hash == hashlib.sha256(TOKEN.encode()).hexdigest()
    # A new value replaces the old one at the next start.
    rotated = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"operator_token": TOKEN + "-2"}))
    c2 = make_client(rotated, auth=False)
    assert c2.get("/api/v1/devices", headers=ok).status_code == 401
    assert c2.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}-2"}).status_code == 200


def test_oversized_and_malformed_bodies_are_refused_and_change_nothing(server_ctx, client):
    big = json.dumps({"method": "full", "params": {}, "cohort": {"device_ids": ["x" * 30] * 80_000}})
    assert len(big) > MAX_BODY_BYTES
    resp = client.post("/api/v1/rounds", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json() == {"detail": f"request body exceeds {MAX_BODY_BYTES} bytes"}
    # Chunked (no Content-Length): counted as it arrives.
    chunks = iter([b"{" + b" " * (1 << 20)] + [b" " * (1 << 20)] * 2 + [b"}"])
    resp = client.post("/api/v1/rounds", content=chunks, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    resp = client.post("/api/v1/rounds", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and isinstance(resp.json()["detail"], str)
    resp = client.post("/api/v1/samples/labels", json={"labels": [], "extra": 1})
    assert resp.status_code == 422
    assert "body.extra: Extra inputs are not permitted" in resp.json()["detail"]
    assert client.get("/api/v1/rounds").json() == {"data": [], "count": 0}
    assert client.get("/api/v1/devices", params={"limit": 1001}).status_code == 422
    assert client.get("/api/v1/devices", params={"offset": -1}).status_code == 422


# --- devices -------------------------------------------------------------------------------


def test_device_list_detail_status_patch_and_revoke(server_ctx, client):
    regs = [register(server_ctx, f"hw-{i}", tags=["lab"] if i % 2 == 0 else ["field"]) for i in range(5)]
    ids = [r.device.id for r in regs]

    page = client.get("/api/v1/devices", params={"limit": 2, "offset": 1}).json()
    assert page["count"] == 5 and [d["id"] for d in page["data"]] == ids[1:3]
    lab = client.get("/api/v1/devices", params={"tag": "lab"}).json()
    assert lab["count"] == 3 and {d["id"] for d in lab["data"]} == {ids[0], ids[2], ids[4]}

    dev = ids[0]
    with transaction(server_ctx.factory) as s:
        D.record_heartbeat(
            s, s.get(Device, dev), model_hash="ab" * 32, active_subnet=2, budget={"latency_ms": 5.0},
            metrics={"accuracy": 0.75}, state="idle", last_error="", samples_pending=7,
        )
        cred_hash = s.get(Device, dev).credential_hash
    detail = client.get(f"/api/v1/devices/{dev}")
    assert detail.status_code == 200
    body = detail.json()
    assert cred_hash not in detail.text and "credential" not in detail.text
    assert body["tags"] == ["lab"] and body["hardware"] == {"cpu": "cortex-a72", "ram_mb": "4096"}
    assert body["model_hash"] == "ab" * 32 and body["active_subnet"] == 2
    assert body["budget"] == {"latency_ms": 5.0} and body["metrics"] == {"accuracy": 0.75}
    assert body["samples_pending"] == 7 and body["online"] is True and body["up_to_date"] is False
    assert body["target_model_hash"] == client.get("/api/v1/models/latest").json()["model_hash"]
    assert body["last_seen_at"].endswith(("Z", "+00:00"))

    status = client.get(f"/api/v1/devices/{dev}/status").json()
    assert set(status) < set(body) and "tags" not in status and "hardware" not in status
    assert status["state"] == "idle" and status["online"] is True

    resp = client.patch(f"/api/v1/devices/{dev}", json={"name": "door camera", "tags": ["b", "a", "a"]})
    assert resp.status_code == 200
    assert resp.json()["name"] == "door camera" and resp.json()["tags"] == ["a", "b"]
    for bad in ({"tags": ["Not Valid"]}, {"name": ""}, {"colour": "red"}, {"tags": [f"t{i}" for i in range(33)]}):
        resp = client.patch(f"/api/v1/devices/{dev}", json=bad)
        assert resp.status_code == 422, bad
        assert isinstance(resp.json()["detail"], str)
    after = client.get(f"/api/v1/devices/{dev}").json()
    assert after["name"] == "door camera" and after["tags"] == ["a", "b"]

    revoked = client.post(f"/api/v1/devices/{dev}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True and revoked.json()["online"] is False
    with server_ctx.factory() as s, pytest.raises(UnauthenticatedError):
        D.authenticate(s, regs[0].credential)
    with server_ctx.factory() as s:  # the other devices are untouched
        assert D.authenticate(s, regs[1].credential).id == ids[1]
    # Revocation sticks: the enrollment token does not bring the device back ...
    with server_ctx.factory() as s, s.begin(), pytest.raises(UnauthenticatedError, match="revoked"):
        D.register_device(s, hardware_id=regs[0].device.hardware_id)
    # ... until an operator restores it; then it registers with a fresh credential.
    restored = client.post(f"/api/v1/devices/{dev}/restore")
    assert restored.status_code == 200 and restored.json()["revoked"] is False
    with server_ctx.factory() as s, s.begin():
        again = D.register_device(s, hardware_id=regs[0].device.hardware_id)
        assert again.device.id == dev and again.credential != regs[0].credential
    with server_ctx.factory() as s, pytest.raises(UnauthenticatedError):
        D.authenticate(s, regs[0].credential)

    for method, path in (("GET", "/api/v1/devices/nope"), ("GET", "/api/v1/devices/nope/status"),
                         ("PATCH", "/api/v1/devices/nope"), ("POST", "/api/v1/devices/nope/revoke"), ("POST", "/api/v1/devices/nope/restore")):
        resp = client.request(method, path, json={})
        assert resp.status_code == 404 and resp.json() == {"detail": "device 'nope' not found"}


# --- samples -------------------------------------------------------------------------------


def test_sample_counts_and_listing(server_ctx, client):
    a, b = register(server_ctx, "hw-a").device.id, register(server_ctx, "hw-b").device.id
    la = [0, 0, 3, None, None, 9]
    lb = [3, None]
    ids_a = ingest(server_ctx, a, random_images(6, 1), la)
    ingest(server_ctx, b, random_images(2, 2), lb)

    counts = client.get("/api/v1/samples/counts").json()
    assert counts["labelled"] == 5 and counts["unlabelled"] == 3 and counts["total"] == 8
    per = {d["device_id"]: d for d in counts["devices"]}
    assert per[a] == {"device_id": a, "labelled": 4, "unlabelled": 2, "by_label": {"0": 2, "3": 1, "9": 1}}
    assert per[b]["by_label"] == {"3": 1} and per[b]["unlabelled"] == 1

    listed = client.get("/api/v1/samples", params={"device_id": a}).json()
    assert listed["count"] == 6
    assert [s["sample_id"] for s in listed["data"]] == ids_a and [s["label"] for s in listed["data"]] == la
    first = listed["data"][0]
    assert first["shape"] == [1, 28, 28] and first["dtype"] == "uint8" and first["metadata"] == {"source": "test"}
    unl = client.get("/api/v1/samples", params={"labelled": "false"}).json()
    assert unl["count"] == 3 and all(s["label"] is None for s in unl["data"])
    lab = client.get("/api/v1/samples", params={"labelled": "true", "limit": 2, "offset": 1}).json()
    assert lab["count"] == 5 and len(lab["data"]) == 2 and all(s["label"] is not None for s in lab["data"])


def test_labels_are_applied_all_or_nothing(server_ctx, client):
    a, b = register(server_ctx, "hw-a").device.id, register(server_ctx, "hw-b").device.id
    xs = random_images(4, 3)
    ids = ingest(server_ctx, a, xs, [None] * 4)
    ingest(server_ctx, b, xs[:1], [None])  # the same image on a second device
    before = labels_in_db(server_ctx)

    missing = hashlib.sha256(b"never uploaded").hexdigest()
    resp = client.post("/api/v1/samples/labels", json={"labels": [
        {"sample_id": ids[1], "label": 4}, {"sample_id": missing, "label": 1}]})
    assert resp.status_code == 404 and resp.json() == {"detail": f"sample {missing[:16]}... not found"}
    resp = client.post("/api/v1/samples/labels", json={"labels": [
        {"sample_id": ids[1], "label": 4}, {"sample_id": ids[2], "label": 10}]})
    assert resp.status_code == 422 and resp.json() == {"detail": "label 10 outside [0, 10)"}
    resp = client.post("/api/v1/samples/labels", json={"labels": [
        {"sample_id": ids[1], "device_id": b, "label": 4}]})  # b has no copy of this sample
    assert resp.status_code == 404
    for bad in ({"labels": []}, {"labels": [{"sample_id": "xyz", "label": 1}]},
                {"labels": [{"sample_id": ids[0], "label": -1}]},
                {"labels": [{"sample_id": ids[0], "label": 1}] * 10_001}):
        assert client.post("/api/v1/samples/labels", json=bad).status_code == 422
    assert labels_in_db(server_ctx) == before

    resp = client.post("/api/v1/samples/labels", json={"labels": [
        {"sample_id": ids[0], "label": 7},  # no device: both copies
        {"sample_id": ids[1], "device_id": a, "label": 4}]})
    assert resp.status_code == 200 and resp.json() == {"updated": 3}
    after = labels_in_db(server_ctx)
    assert after[(a, ids[0])] == 7 and after[(b, ids[0])] == 7 and after[(a, ids[1])] == 4
    assert after[(a, ids[2])] is None and after[(a, ids[3])] is None


# --- models --------------------------------------------------------------------------------


def test_model_versions_download_and_artefacts(server_ctx, client):
    listed = client.get("/api/v1/models").json()
    assert listed["count"] == 1
    v0 = listed["data"][0]
    assert v0["number"] == 0 and v0["method"] == "init" and v0["fleet_default"] is True
    assert v0["parent_hash"] is None and v0["arch"]["kind"] == "mlp"
    for ref in ("latest", "0", v0["model_hash"]):
        assert client.get(f"/api/v1/models/{ref}").json() == v0
    for ref in ("7", "f" * 64, "not-a-hash"):
        resp = client.get(f"/api/v1/models/{ref}")
        assert resp.status_code == 404 and resp.json()["detail"].startswith("model version")
    assert client.get(f"/api/v1/models/{'f' * 65}").status_code == 422

    resp = client.get("/api/v1/models/latest/download")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
    assert int(resp.headers["content-length"]) == len(resp.content) == v0["full_artefact_size"]
    assert hashlib.sha256(resp.content).hexdigest() == resp.headers["x-edgeloop-artefact-sha256"]
    assert resp.headers["x-edgeloop-artefact-sha256"] == v0["full_artefact_sha256"]
    decoded = decode_artefact(resp.content, encoding=FULL_MODEL_ENCODING)
    assert decoded.model_hash == resp.headers["x-edgeloop-model-hash"] == v0["model_hash"]
    part = client.get("/api/v1/models/0/download", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == resp.content[100:200]
    assert client.get(f"/api/v1/models/{'e' * 64}/download").status_code == 404

    arts = client.get(f"/api/v1/models/{v0['model_hash']}/artefacts").json()
    assert arts["count"] == 1
    full = arts["data"][0]
    assert full["kind"] == "full" and full["encoding"] == FULL_MODEL_ENCODING and full["base_model_hash"] is None
    assert full["size"] == len(resp.content) and full["sha256"] == v0["full_artefact_sha256"]
    again = client.get(f"/api/v1/models/latest/artefacts/{full['sha256']}/download")
    assert again.status_code == 200 and again.content == resp.content
    assert client.get(f"/api/v1/models/latest/artefacts/{'0' * 64}/download").status_code == 404


# --- OpenAPI -------------------------------------------------------------------------------


def test_openapi_ids_and_descriptions(client):
    spec = client.get("/openapi.json").json()
    ops = [(path, op) for path, item in spec["paths"].items() for op in item.values()]
    for path, op in ops:
        tag = op["tags"][0]
        assert op["operationId"].startswith(f"{tag}-"), op["operationId"]
        assert op.get("description"), path
        for param in op.get("parameters", []):
            assert param.get("description"), (path, param["name"])
    for name, schema in spec["components"]["schemas"].items():
        for prop, ps in schema.get("properties", {}).items():
            assert ps.get("description"), f"{name}.{prop} has no description"
        if name.endswith("Public"):  # a response always carries every field it documents
            assert set(schema.get("required", [])) == set(schema.get("properties", {})), name
    assert {"update_state", "rollbacks"} <= set(spec["components"]["schemas"]["DeviceStatusPublic"]["properties"])
    assert spec["components"]["schemas"]["RoundSummaryPublic"]["properties"]["data_scope"]["enum"] == ["cohort", "all"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # our 422s are {"detail": str}
    assert {"rounds-create_round", "models-download_model", "samples-set_labels"} <= {op["operationId"] for _, op in ops}
    assert client.get("/docs").status_code == 200
