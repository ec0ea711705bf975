"""REST edges: bounded pagination, 405 with a complete Allow header, malformed bodies as 422,
and an OpenAPI document that refuses the bodies the server refuses (issue 8, fault 7)."""

from __future__ import annotations

import jsonschema_rs
import pytest

from server.api.pagination import MAX_LIMIT, MAX_OFFSET
from tests.server.test_rest_api import ingest, random_images, register

LISTS = ["/api/v1/devices", "/api/v1/samples", "/api/v1/rounds", "/api/v1/models"]


@pytest.mark.parametrize("path", LISTS)
def test_every_pagination_parameter_is_bounded(server_ctx, client, path):
    device = register(server_ctx, "hw-page").device
    ingest(server_ctx, device.id, random_images(2, seed=1), [1, None])
    assert client.post("/api/v1/rounds", json={}).status_code == 202  # something in every list
    for params, field in (({"offset": 2**63}, "offset"), ({"offset": MAX_OFFSET + 1}, "offset"),
                          ({"offset": -1}, "offset"), ({"limit": MAX_LIMIT + 1}, "limit"), ({"limit": 0}, "limit")):
        resp = client.get(path, params=params)
        assert resp.status_code == 422, (params, resp.text)
        assert resp.json()["detail"].startswith(f"query.{field}: Input should be"), resp.text
    edge = client.get(path, params={"offset": MAX_OFFSET, "limit": MAX_LIMIT})
    assert edge.status_code == 200 and edge.json()["data"] == [] and edge.json()["count"] >= 1
    params = {p["name"]: p["schema"] for p in client.get("/openapi.json").json()["paths"][path]["get"]["parameters"]}
    assert (params["offset"]["minimum"], params["offset"]["maximum"]) == (0, MAX_OFFSET)
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, MAX_LIMIT)


def test_405_names_every_method_of_the_path(client):
    for method, path, allow in (("OPTIONS", "/api/v1/rounds", "GET, POST"),
                                ("DELETE", "/api/v1/devices/abc", "GET, PATCH"),
                                ("PUT", "/api/v1/rounds/abc/cancel", "POST"),
                                ("OPTIONS", "/healthz", "GET")):
        resp = client.request(method, path)
        assert resp.status_code == 405, (method, path)
        assert resp.headers["allow"] == allow, (method, path)
        assert resp.json() == {"detail": f"method not allowed here; allowed: {allow}"}


def test_malformed_json_bodies_are_422_with_a_clear_detail(client):
    for body, detail in ((b"\xff\xfe{", "body: not a UTF-8 JSON document"),
                         (b'{"method": "full"', "body: invalid JSON at character 17: Expecting ',' delimiter")):
        for path in ("/api/v1/rounds", "/api/v1/samples/labels"):
            resp = client.post(path, content=body, headers={"content-type": "application/json"})
            assert resp.status_code == 422 and resp.json() == {"detail": detail}, (path, resp.text)
    assert client.get("/api/v1/rounds").json()["count"] == 0


def test_a_model_ref_of_unicode_digits_is_404_not_500(client):
    resp = client.get("/api/v1/models/\u2078")  # superscript eight: str.isdigit() but not int()
    assert resp.status_code == 404 and resp.json() == {"detail": "model version '\u2078' not found"}
    assert client.get("/api/v1/models/0").json()["number"] == 0


def _body_validator(client, path: str, method: str):
    spec = client.get("/openapi.json").json()
    ref = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**ref, "components": spec["components"]})


def test_the_schema_refuses_the_round_and_tag_bodies_the_server_refuses(server_ctx, client):
    device = register(server_ctx, "hw-cohort", tags=["lab"]).device
    rounds = _body_validator(client, "/api/v1/rounds", "post")
    refused = [{"cohort": {}}, {"cohort": {"all": True, "tag": "lab"}}, {"cohort": {"all": False}},
               {"cohort": {"device_ids": []}}, {"cohort": {"tag": "Bad Tag"}}, {"cohort": {"tag": "lab\n"}},
               {"cohort": {"everyone": True}}, {"method": "init"}, {"method": ""}]
    for body in refused:
        assert not rounds.is_valid(body), body
        assert client.post("/api/v1/rounds", json=body).status_code == 422, body
    accepted = [{}, {"cohort": {"all": True}}, {"cohort": {"tag": "lab"}},
                {"cohort": {"device_ids": [device.id]}, "method": "full"}]
    for body in accepted:
        assert rounds.is_valid(body), body
        assert client.post("/api/v1/rounds", json=body).status_code == 202, body

    patch = _body_validator(client, "/api/v1/devices/{device_id}", "patch")
    for tags in (["lab\n"], ["Bad"], [""], ["x" * 65]):
        assert not patch.is_valid({"tags": tags}), tags
        resp = client.patch(f"/api/v1/devices/{device.id}", json={"tags": tags})
        assert resp.status_code == 422, (tags, resp.text)
        assert resp.json()["detail"].startswith("body.tags.0: String should match pattern"), resp.text
    assert patch.is_valid({"tags": ["door", "lab"]})
    assert client.patch(f"/api/v1/devices/{device.id}", json={"tags": ["lab", "door"]}).json()["tags"] == ["door", "lab"]


def test_the_schema_bounds_labels_by_the_servers_num_classes(server_ctx, client):
    device = register(server_ctx, "hw-label").device
    sid = ingest(server_ctx, device.id, random_images(1, seed=3), [None])[0]
    n = server_ctx.settings.arch.num_classes
    labels = _body_validator(client, "/api/v1/samples/labels", "post")
    too_big = {"labels": [{"sample_id": sid, "label": n}]}
    assert not labels.is_valid(too_big)
    assert client.post("/api/v1/samples/labels", json=too_big).json() == {"detail": f"label {n} outside [0, {n})"}
    top = {"labels": [{"sample_id": sid, "label": n - 1}]}
    assert labels.is_valid(top)
    assert client.post("/api/v1/samples/labels", json=top).json() == {"updated": 1}
