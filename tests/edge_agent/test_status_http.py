from __future__ import annotations

import http.client
import json
import socket

import pytest

from edge_agent.status_http import MAX_BODY_BYTES, StatusServer


def request(server: StatusServer, method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def server():
    calls = {"status": 0, "budgets": []}

    def get_status() -> dict:
        calls["status"] += 1
        return {"model_hash": "a" * 64, "polls": calls["status"], "queue": {"items": 3}}

    def on_put_budget(body: dict) -> dict:
        if "uplink_bytes_per_day" in body and body["uplink_bytes_per_day"] < 0:
            raise ValueError("uplink_bytes_per_day must be >= 0")
        if body.get("explode"):
            raise RuntimeError("boom")
        calls["budgets"].append(body)
        return {"accepted": body}

    srv = StatusServer("127.0.0.1", 0, get_status, on_put_budget)
    srv.start()
    srv.calls = calls
    yield srv
    srv.stop()


def test_status_and_health(server):
    assert server.port > 0
    code, headers, body = request(server, "GET", "/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"model_hash": "a" * 64, "polls": 1, "queue": {"items": 3}}
    assert json.loads(request(server, "GET", "/status?verbose=1")[2])["polls"] == 2
    assert request(server, "GET", "/healthz")[::2] == (200, b"ok")


def test_put_budget_passes_the_object_to_the_callback(server):
    payload = {"uplink_bytes_per_day": 5_000_000, "energy_mj_per_inference": 2.5}
    code, _, body = request(server, "PUT", "/budget", json.dumps(payload).encode())
    assert code == 200 and json.loads(body) == {"accepted": payload}
    assert server.calls["budgets"] == [payload]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (json.dumps({"uplink_bytes_per_day": -1}).encode(), "must be >= 0"),
        (json.dumps({"pad": "x" * MAX_BODY_BYTES}).encode(), "exceeds"),
    ],
)
def test_bad_budget_bodies_get_400_with_a_json_error(server, body, fragment):
    code, _, raw = request(server, "PUT", "/budget", body)
    assert code == 400 and fragment in json.loads(raw)["error"]
    assert server.calls["budgets"] == []


def test_failing_callbacks_give_500(server):
    code, _, raw = request(server, "PUT", "/budget", b'{"explode": true}')
    assert code == 500 and "boom" in json.loads(raw)["error"]

    def broken() -> dict:
        raise RuntimeError("no status")

    with StatusServer("127.0.0.1", 0, broken) as srv:
        code, _, raw = request(srv, "GET", "/status")
        assert code == 500 and "no status" in json.loads(raw)["error"]
        assert request(srv, "PUT", "/budget", b"{}")[0] == 501  # no budget callback


def test_unknown_paths_and_wrong_methods(server):
    code, _, raw = request(server, "GET", "/nope")
    assert code == 404 and "/nope" in json.loads(raw)["error"]
    code, headers, _ = request(server, "PUT", "/status", b"{}")
    assert code == 405 and headers["Allow"] == "GET"
    code, headers, _ = request(server, "GET", "/budget")
    assert code == 405 and headers["Allow"] == "PUT"
    assert request(server, "POST", "/budget", b"{}")[0] == 405
    assert request(server, "DELETE", "/nothing")[0] == 404


def test_stop_releases_the_port():
    srv = StatusServer("127.0.0.1", 0, dict)
    srv.start()
    port = srv.port
    assert request(srv, "GET", "/healthz")[0] == 200
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    again = StatusServer("127.0.0.1", port, dict)
    again.start()
    assert again.port == port
    again.stop()


def test_default_bind_is_loopback():
    srv = StatusServer(get_status=dict)
    srv.start()
    try:
        assert srv._server.server_address[0] == "127.0.0.1"
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="port"):
        StatusServer("127.0.0.1", 70000, dict)


def test_a_token_guards_every_route_but_healthz_and_writes_change_nothing_without_it():
    budgets: list[dict] = []
    srv = StatusServer("127.0.0.1", 0, lambda: {"ok": True}, lambda b: budgets.append(b) or {"accepted": b},
                       token="s3cret-status-token")
    srv.start()
    try:
        payload = json.dumps({"energy_mj_per_inference": 1.0}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-status-token"},
                        {"Authorization": "Bearer s3cret-status-token "}):
            for method, path, body in (("GET", "/status", None), ("PUT", "/budget", payload)):
                code, hdrs, raw = request(srv, method, path, body, headers)
                assert code == 401 and hdrs["WWW-Authenticate"] == "Bearer", (headers, path)
                assert "status_token" in json.loads(raw)["error"]
        assert budgets == []  # a refused write reached nothing
        assert request(srv, "GET", "/healthz")[::2] == (200, b"ok")  # liveness stays open
        good = {"Authorization": "Bearer s3cret-status-token"}
        assert request(srv, "GET", "/status", headers=good)[0] == 200
        assert request(srv, "PUT", "/budget", payload, good)[0] == 200
        assert budgets == [{"energy_mj_per_inference": 1.0}]
    finally:
        srv.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "device.local"])
def test_settings_refuse_a_non_loopback_status_endpoint_without_a_token(host):
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings

    with pytest.raises(ValidationError, match="status_token"):
        AgentSettings(status_host=host)
    assert AgentSettings(status_host=host, status_token="t").status_token == "t"
    assert AgentSettings(status_host=host, status_port=-1).status_port == -1  # disabled: nothing exposed
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert AgentSettings(status_host=loopback).status_host == loopback
