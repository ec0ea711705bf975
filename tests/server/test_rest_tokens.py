"""Operator tokens (first-start bootstrap, REST and CLI) and the audit log, on SQLite and
PostgreSQL (``server_ctx``)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat

from sqlalchemy import func, select
from typer.testing import CliRunner

from edgeloop.cli import app as cli
from server.api.main import create_app
from server.db.engine import transaction
from server.db.models import AuditEvent, OperatorToken, Round
from server.domain import audit
from server.domain import operators as ops
from tests.server.test_rest_api import make_client, register


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_first_start_creates_one_admin_token_in_a_0600_file(server_ctx, caplog):
    path = ops.bootstrap_token_path(server_ctx.settings.data_dir)
    assert not path.exists()
    with caplog.at_level(logging.WARNING, logger="server.domain.operators"):
        create_app(server_ctx)
    token = ops.read_bootstrap_token(server_ctx.settings.data_dir)
    assert ops.TOKEN_RE.match(token)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1 and token in caplog.text
    with server_ctx.factory() as s:
        (row,) = s.scalars(select(OperatorToken))
        assert (row.name, row.scope) == ("bootstrap-admin", "admin")
        assert row.secret_hash == hashlib.sha256(token.encode()).hexdigest()  # only the hash is stored
    # A second start (or a second app) keeps it: an active admin token exists.
    caplog.clear()
    c = make_client(server_ctx)
    assert ops.read_bootstrap_token(server_ctx.settings.data_dir) == token and token not in caplog.text
    assert c.get("/api/v1/tokens").json()["count"] == 1
    # Once every admin token is revoked, the next start makes a new one (recovery needs the data dir).
    with transaction(server_ctx.factory) as s:
        ops.revoke_token(s, row.id)
    create_app(server_ctx)
    assert ops.read_bootstrap_token(server_ctx.settings.data_dir) != token


def test_tokens_are_created_listed_and_revoked_over_rest(server_ctx, client):
    resp = client.post("/api/v1/tokens", json={"name": "ci deploy", "scope": "operate", "expires_in_s": 3600})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert resp.headers["location"] == f"/api/v1/tokens/{created['id']}"
    assert created["token"].startswith(f"elop_{created['id']}_") and created["active"]
    assert created["created_by"] == "bootstrap-admin" and created["expires_at"] is not None
    listed = client.get("/api/v1/tokens").json()
    assert listed["count"] == 2 and all("token" not in t for t in listed["data"])
    ci = _bearer(created["token"])
    assert client.post("/api/v1/rounds", json={"cohort": {"all": True}}, headers=ci).status_code == 202
    assert client.get("/api/v1/tokens", headers=ci).status_code == 403  # operate < admin

    revoked = client.delete(f"/api/v1/tokens/{created['id']}")
    assert revoked.status_code == 200 and not revoked.json()["active"] and revoked.json()["revoked_at"]
    again = client.delete(f"/api/v1/tokens/{created['id']}").json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]  # idempotent
    resp = client.post("/api/v1/rounds", json={"cohort": {"all": True}}, headers=ci)
    assert resp.status_code == 401 and "was revoked" in resp.json()["detail"]
    assert client.delete("/api/v1/tokens/nope").status_code == 404

    for bad in ({"name": "x", "scope": "root"}, {"name": "", "scope": "read"}, {"name": "x", "scope": "read", "expires_in_s": 1},
                {"name": "x", "scope": "read", "extra": 1}):
        assert client.post("/api/v1/tokens", json=bad).status_code == 422, bad
    resp = client.post("/api/v1/tokens", json={"name": "anonymous", "scope": "read"})
    assert resp.status_code == 422 and "reserved" in resp.json()["detail"]
    assert client.get("/api/v1/tokens").json()["count"] == 2  # the refused ones made nothing


def test_audit_log_records_every_mutating_call_with_its_outcome(server_ctx, client):
    dev = register(server_ctx, "audit-hw").device.id
    anon = make_client(server_ctx, auth=False)
    assert client.get("/api/v1/devices").status_code == 200  # reads are not audited
    assert client.patch(f"/api/v1/devices/{dev}", json={"name": "door"}).status_code == 200
    rnd = client.post("/api/v1/rounds", json={"cohort": {"all": True}}).json()["id"]
    assert client.post(f"/api/v1/devices/{dev}/revoke").status_code == 200
    assert client.post("/api/v1/devices/nope/revoke").status_code == 404
    assert anon.post("/api/v1/rounds", json={"cohort": {"all": True}}).status_code == 401
    assert client.post("/api/v1/rounds", content=b"x" * (3 << 20), headers={"content-type": "application/json"}).status_code == 413

    page = client.get("/api/v1/audit").json()
    assert page["count"] == 6
    got = [(e["token_name"], e["action"], e["target"], e["status"]) for e in reversed(page["data"])]
    assert got == [
        ("bootstrap-admin", "devices-update_device", f"device_id={dev}", 200),
        ("bootstrap-admin", "rounds-create_round", f"created={rnd}", 202),
        ("bootstrap-admin", "devices-revoke_device", f"device_id={dev}", 200),
        ("bootstrap-admin", "devices-revoke_device", "device_id=nope", 404),
        ("anonymous", "rounds-create_round", "", 401),
        ("anonymous", "unmatched", "", 413),  # refused before any route ran
    ]
    assert page["data"][1]["detail"] == ops.MISSING and page["data"][2]["detail"] == "device 'nope' not found"
    assert all(e["method"] in ("PATCH", "POST") and e["at"] for e in page["data"])

    assert client.get("/api/v1/audit", params={"token": "anonymous"}).json()["count"] == 2
    assert client.get("/api/v1/audit", params={"action": "rounds-create_round"}).json()["count"] == 2
    first = page["data"][-1]["at"]
    assert client.get("/api/v1/audit", params={"until": first}).json()["count"] == 0
    assert client.get("/api/v1/audit", params={"since": first}).json()["count"] == 6
    two = client.get("/api/v1/audit", params={"limit": 2, "offset": 1}).json()
    assert two["count"] == 6 and [e["id"] for e in two["data"]] == [e["id"] for e in page["data"][1:3]]
    assert client.get("/api/v1/audit", params={"since": "yesterday"}).status_code == 422


def test_a_call_whose_outcome_cannot_be_recorded_still_leaves_its_audit_row(server_ctx, client, monkeypatch):
    def broken(*_args, **_kw):
        raise RuntimeError("audit database gone")

    monkeypatch.setattr(audit, "finish", broken)
    resp = client.post("/api/v1/rounds", json={"cohort": {"all": True}})
    assert resp.status_code == 202  # the change is made and acknowledged...
    with server_ctx.factory() as s:
        assert s.scalar(select(func.count()).select_from(Round)) == 1
        (event,) = s.scalars(select(AuditEvent))
        assert (event.method, event.path, event.status) == ("POST", "/api/v1/rounds", None)  # ...and on record


def test_cli_creates_lists_and_revokes_tokens_and_reads_the_audit_log(server_ctx, client):
    settings = server_ctx.settings
    db = ["--database-url", settings.resolved_database_url, "--data-dir", str(settings.data_dir)]
    runner = CliRunner()
    out = runner.invoke(cli, ["server", "token", "create", "--name", "grafana", "--scope", "read", "--expires-in", "30d", *db])
    assert out.exit_code == 0, out.output
    token = out.stdout.strip()
    assert ops.TOKEN_RE.match(token) and "not shown again" in out.stderr
    assert client.get("/api/v1/devices", headers=_bearer(token)).status_code == 200
    token_id = ops.TOKEN_RE.match(token).group(1)

    listed = runner.invoke(cli, ["server", "token", "list", *db])
    assert listed.exit_code == 0 and token_id in listed.stdout and "grafana" in listed.stdout
    assert token not in listed.stdout
    revoked = runner.invoke(cli, ["server", "token", "revoke", token_id, *db])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert client.get("/api/v1/devices", headers=_bearer(token)).status_code == 401

    for bad in (["--scope", "root"], ["--scope", "read", "--expires-in", "forever"], ["--name", "", "--scope", "read"]):
        args = ["server", "token", "create", *(["--name", "x"] if "--name" not in bad else []), *bad, *db]
        res = runner.invoke(cli, args)
        assert res.exit_code == 2 and "error:" in res.stderr, (bad, res.output)
    assert runner.invoke(cli, ["server", "token", "revoke", "nope", *db]).exit_code == 2

    client.post("/api/v1/rounds", json={"cohort": {"all": True}})
    make_client(dataclasses.replace(server_ctx), auth=False).post("/api/v1/rounds", json={"cohort": {"all": True}})
    shown = runner.invoke(cli, ["server", "audit", "--limit", "1", *db])
    assert shown.exit_code == 0 and "anonymous" in shown.stdout and "401" in shown.stdout
    assert "bootstrap-admin" not in shown.stdout
    both = runner.invoke(cli, ["server", "audit", *db])
    assert "rounds-create_round" in both.stdout and "bootstrap-admin" in both.stdout
