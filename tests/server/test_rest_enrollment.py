"""The enrollment-token REST endpoints (admin scope): create shows the secret once, list never
does, delete revokes; a token made here registers a device over gRPC."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from edgeloop.cli import app as cli
from server.db.engine import transaction
from server.domain import operators as ops


def test_create_list_revoke(client, fleet):
    resp = client.post("/api/v1/enrollment-tokens",
                       json={"name": "site a", "tags": ["site-a"], "max_uses": 2, "expires_in_s": 3600})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    secret = body.pop("token")
    assert secret.startswith(f"elen_{body['id']}_") and resp.headers["location"].endswith(body["id"])
    assert body["status"] == "active" and body["uses"] == 0 and body["tags"] == ["site-a"]

    reg = fleet.register("hw-1", token=secret)
    listed = client.get("/api/v1/enrollment-tokens").json()
    assert listed["count"] == 1 and listed["data"][0]["uses"] == 1 and secret not in str(listed)
    device = client.get(f"/api/v1/devices/{reg.device_id}").json()
    assert device["tags"] == ["site-a"]

    revoked = client.delete(f"/api/v1/enrollment-tokens/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert "token" not in revoked.json()
    with pytest.raises(grpc.RpcError) as err:
        fleet.register("hw-2", token=secret)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert client.delete(f"/api/v1/enrollment-tokens/{body['id']}").status_code == 200  # idempotent
    assert client.delete("/api/v1/enrollment-tokens/nope").status_code == 404


def test_create_defaults_and_validation(client):
    body = client.post("/api/v1/enrollment-tokens", json={"name": "one device"}).json()
    assert body["max_uses"] == 1 and body["tags"] == [] and body["reenroll"] is False
    for bad in ({}, {"name": ""}, {"name": "x", "max_uses": 0}, {"name": "x", "expires_in_s": 10},
                {"name": "x", "expires_in_s": 400 * 86400}, {"name": "x", "tags": ["Bad Tag"]},
                {"name": "x", "unknown": 1}, {"name": "x", "max_uses": 2_000_000}, {"name": "x", "reenroll": "maybe"}):
        resp = client.post("/api/v1/enrollment-tokens", json=bad)
        assert resp.status_code == 422, (bad, resp.text)
        assert isinstance(resp.json()["detail"], str)
    assert client.get("/api/v1/enrollment-tokens").json()["count"] == 1  # nothing made by a refusal


def test_needs_the_admin_scope(client, server_ctx):
    with transaction(server_ctx.factory) as s:
        _, operate = ops.create_token(s, name="ops", scope="operate")
    headers = {"Authorization": f"Bearer {operate}"}
    for method, path in (("GET", "/api/v1/enrollment-tokens"), ("POST", "/api/v1/enrollment-tokens"),
                         ("DELETE", "/api/v1/enrollment-tokens/x")):
        resp = client.request(method, path, json={"name": "x"}, headers=headers)
        assert resp.status_code == 403, (method, resp.text)
        resp = client.request(method, path, json={"name": "x"}, headers={"Authorization": "Bearer nope"})
        assert resp.status_code == 401, (method, resp.text)


def test_a_reenroll_token_is_shown_as_such_and_re_registers_another_tokens_device(client, fleet):
    ordinary = client.post("/api/v1/enrollment-tokens", json={"name": "batch", "max_uses": 5}).json()
    real = fleet.register("hw-1", token=ordinary["token"])
    other = client.post("/api/v1/enrollment-tokens", json={"name": "other", "max_uses": 5}).json()
    with pytest.raises(grpc.RpcError) as err:
        fleet.register("hw-1", token=other["token"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--reenroll" in err.value.details()
    fix = client.post("/api/v1/enrollment-tokens", json={"name": "replace hw-1", "reenroll": True})
    assert fix.status_code == 201 and fix.json()["reenroll"] is True
    assert fleet.register("hw-1", token=fix.json()["token"]).device_id == real.device_id
    listed = {t["name"]: t for t in client.get("/api/v1/enrollment-tokens").json()["data"]}
    assert {n: (t["reenroll"], t["uses"]) for n, t in listed.items()} == {
        "batch": (False, 1), "other": (False, 0), "replace hw-1": (True, 1)}


def test_cli_reenroll_flag_makes_a_token_that_re_registers_an_enrolled_device(server_ctx, fleet):
    settings = server_ctx.settings
    db = ["--database-url", settings.resolved_database_url, "--data-dir", str(settings.data_dir)]
    runner = CliRunner()
    real = fleet.register("hw-1")  # enrolled by the fleet's ordinary token
    plain = runner.invoke(cli, ["server", "enrollment", "create", "--name", "plain", "--json", *db])
    fix = runner.invoke(cli, ["server", "enrollment", "create", "--name", "fix", "--reenroll", "--json", *db])
    assert plain.exit_code == 0 and fix.exit_code == 0, (plain.output, fix.output)
    plain_rec, fix_rec = json.loads(plain.stdout), json.loads(fix.stdout)
    assert (plain_rec["reenroll"], fix_rec["reenroll"]) == (False, True)
    with pytest.raises(grpc.RpcError) as err:
        fleet.register("hw-1", token=plain_rec["token"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fleet.register("hw-1", token=fix_rec["token"]).device_id == real.device_id
    listed = runner.invoke(cli, ["server", "enrollment", "list", *db])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[-1]: line for line in listed.stdout.splitlines()}
    assert "reenroll" in lines["fix"] and "reenroll" not in lines["plain"]
