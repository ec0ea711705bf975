"""Operator authentication, generated from the app's route table: every route declares exactly
one scope, and refuses a missing, malformed, wrong, expired or revoked token (401) and a token
of a lower scope (403), changing nothing. A new route is covered the moment it is added.

Runs on SQLite and PostgreSQL (``server_ctx``)."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

import pytest
from sqlalchemy import func, inspect, select

from server.api.deps import SCOPES, route_scopes
from server.api.main import API_PREFIX, OPEN_PATHS, api_routes
from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import AuditEvent, OperatorToken, Round
from server.domain import operators as ops
from server.domain import rounds as R
from server.domain.versions import latest_version
from tests.server.test_rest_api import ingest, make_client, random_images, register

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def _token(ctx, scope: str, name: str | None = None, **kw) -> tuple[str, str]:
    with transaction(ctx.factory) as s:
        row, plaintext = ops.create_token(s, name=name or f"{scope}-token", scope=scope, **kw)
        return row.id, plaintext


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _snapshot(ctx) -> dict[str, list]:
    """Every row of every table but the audit log (which records the refusals)."""
    out = {}
    with ctx.engine.connect() as conn:
        for table in sorted(inspect(conn).get_table_names()):
            if table in ("audit_events", "alembic_version"):
                continue
            rows = conn.exec_driver_sql(f'SELECT * FROM "{table}"').all()
            out[table] = sorted(map(repr, rows))
    return out


@pytest.fixture
def world(server_ctx):
    """A fleet with one of everything a route can name, and one token per way of being wrong."""
    # Hundreds of refusals from one client: the failed-authentication limit is tested below.
    unlimited = dataclasses.replace(server_ctx, settings=server_ctx.settings.model_copy(
        update={"rest_auth_fail_rate_per_s": 0}))
    c = make_client(unlimited, auth=False)  # creates the bootstrap admin token
    device = register(server_ctx, "auth-hw", tags=["lab"]).device
    samples = ingest(server_ctx, device.id, random_images(3, seed=1), [1, None, 2])
    with transaction(server_ctx.factory) as s:
        rnd = R.create_round(s, method="full", cohort={"all": True}, params={})
        v0 = latest_version(s)
        ids = {"device_id": device.id, "round_id": rnd.id, "model_ref": v0.model_hash,
               "sha256": v0.full_artefact_sha256, "sample": samples[1]}
    tokens = {scope: _token(server_ctx, scope) for scope in SCOPES}
    ids["token_id"] = tokens["read"][0]  # a real token: a DELETE that got through would revoke it
    expired_id, expired = _token(server_ctx, "admin", "expired-admin", expires_in=timedelta(seconds=60))
    revoked_id, revoked = _token(server_ctx, "admin", "revoked-admin")
    with transaction(server_ctx.factory) as s:
        s.get(OperatorToken, expired_id).expires_at = utcnow() - timedelta(seconds=1)
        ops.revoke_token(s, revoked_id)
    bad = {
        "missing": ({}, ops.MISSING),
        "basic scheme": ({"Authorization": f"Basic {tokens['admin'][1]}"}, ops.MISSING),
        "malformed": (_bearer("not a token at all"), ops.INVALID),
        "too long": (_bearer("x" * 1000), ops.INVALID),
        "wrong secret": (_bearer(tokens["admin"][1][:-4] + "AAAA"), ops.INVALID),
        "expired": (_bearer(expired), f"operator token {expired_id} expired at"),
        "revoked": (_bearer(revoked), f"operator token {revoked_id} was revoked at"),
    }
    return c, ids, tokens, bad


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda m: ids.get(m.group(1), "x1"), path)


def _calls(app, ids) -> list[tuple[str, str, str]]:
    """(method, concrete path, scope) of every route that needs a token."""
    out = []
    for route in api_routes(app):
        if route.path in OPEN_PATHS:
            continue
        (scope,) = route_scopes(route)
        out.extend((m, _fill(route.path, ids), scope) for m in sorted(route.methods - {"HEAD"}))
    return out


def test_every_route_declares_exactly_one_scope(client):
    routes = api_routes(client.app)
    covered = {r.path for r in routes if r.path.startswith(API_PREFIX)} | {"/metrics"}
    assert {"/api/v1/rounds", "/api/v1/tokens", "/api/v1/audit", "/metrics"} <= covered
    for route in routes:
        scopes = route_scopes(route)
        if route.path in OPEN_PATHS:
            assert scopes == [], route.path
        else:
            assert len(scopes) == 1 and scopes[0] in SCOPES, (route.path, scopes)
    # The OpenAPI document names the scheme and the 401/403 answers of every guarded operation.
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["OperatorToken"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["OperatorToken"]["description"]}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if path in OPEN_PATHS:
                assert "security" not in op and "401" not in op["responses"], path
                continue
            assert op["security"] == [{"OperatorToken": []}], (method, path)
            assert {"401", "403", "503"} <= set(op["responses"]), (method, path)


def test_every_route_refuses_bad_and_insufficient_tokens_and_changes_nothing(server_ctx, world):
    c, ids, tokens, bad = world
    calls = _calls(c.app, ids)
    assert len(calls) >= 20
    before = _snapshot(server_ctx)
    with server_ctx.factory() as s:
        audit_before = s.scalar(select(func.count()).select_from(AuditEvent))
    cases = 0
    expected_audit: list[tuple[str, str, int, str]] = []
    for method, path, scope in calls:
        for why, (headers, message) in bad.items():
            resp = c.request(method, path, headers=headers, json={})
            assert resp.status_code == 401, (why, method, path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer", (why, method, path)
            assert resp.json()["detail"].startswith(message), (why, method, path, resp.json())
            cases += 1
            if method in MUTATING:
                name = {"expired": "expired-admin", "revoked": "revoked-admin"}.get(why, ops.ANONYMOUS)
                expected_audit.append((method, path, 401, name))
        for lower in SCOPES[:SCOPES.index(scope)]:
            resp = c.request(method, path, headers=_bearer(tokens[lower][1]), json={})
            assert resp.status_code == 403, (lower, method, path, resp.text)
            assert resp.json()["detail"] == (f"operator token {tokens[lower][0]} ('{lower}-token') has scope "
                                             f"{lower!r}; this call needs {scope!r}")
            cases += 1
            if method in MUTATING:
                expected_audit.append((method, path, 403, f"{lower}-token"))
    assert _snapshot(server_ctx) == before  # not even a token's last_used_at moved
    with server_ctx.factory() as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id).offset(audit_before)))
    assert [(e.method, e.path, e.status, e.token_name) for e in events] == expected_audit
    assert all(e.action != "unmatched" for e in events)
    print(f"\nroutes needing a token: {len(calls)}; rejection cases: {cases}")
    assert cases >= len(calls) * len(bad)


def test_each_scope_reaches_what_it_covers(server_ctx, world):
    c, ids, tokens, _ = world
    read, operate, admin = (_bearer(tokens[s][1]) for s in SCOPES)
    assert c.get("/api/v1/devices", headers=read).status_code == 200
    assert c.get("/metrics", headers=read).status_code == 200
    assert c.post("/api/v1/rounds", json={"cohort": {"all": True}}, headers=operate).status_code == 202
    assert c.post(f"/api/v1/rounds/{ids['round_id']}/cancel", headers=operate).status_code == 200
    label = {"sample_id": ids["sample"], "device_id": ids["device_id"], "label": 3}
    assert c.post("/api/v1/samples/labels", json={"labels": [label]}, headers=operate).json() == {"updated": 1}
    assert c.patch(f"/api/v1/devices/{ids['device_id']}", json={"name": "x"}, headers=operate).status_code == 403
    assert c.patch(f"/api/v1/devices/{ids['device_id']}", json={"name": "x"}, headers=admin).status_code == 200
    assert c.get("/api/v1/audit", headers=admin).status_code == 200
    with server_ctx.factory() as s:  # an accepted call marks its token as used
        assert s.get(OperatorToken, tokens["operate"][0]).last_used_at is not None


def test_an_unauthenticated_round_is_refused(server_ctx):
    c = make_client(server_ctx, auth=False)
    resp = c.post("/api/v1/rounds", json={"cohort": {"all": True}})
    assert resp.status_code == 401
    assert resp.json() == {"detail": ops.MISSING}
    with server_ctx.factory() as s:
        assert s.scalar(select(func.count()).select_from(Round)) == 0


def test_metrics_can_be_made_public(server_ctx):

    assert make_client(server_ctx, auth=False).get("/metrics").status_code == 401
    public = dataclasses.replace(server_ctx, settings=server_ctx.settings.model_copy(update={"metrics_public": True}))
    c = make_client(public, auth=False)
    assert c.get("/metrics").status_code == 200
    assert "security" not in c.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert c.get("/api/v1/devices").status_code == 401  # only /metrics opens


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # in-memory limits: the database is incidental
def test_failed_authentications_are_limited_per_source_and_stop_reaching_the_audit_log(server_ctx):
    from fastapi.testclient import TestClient

    from server.api.main import create_app, rest_source
    from server.domain.operators import read_bootstrap_token

    limited = dataclasses.replace(server_ctx, settings=server_ctx.settings.model_copy(
        update={"rest_auth_fail_rate_per_s": 0.001, "rest_auth_fail_burst": 3}))
    app = create_app(limited)
    admin = _bearer(read_bootstrap_token(server_ctx.settings.data_dir))
    guesser = TestClient(app, client=("203.0.113.7", 4000))
    with server_ctx.factory() as s:
        audit_before = s.scalar(select(func.count()).select_from(AuditEvent))
    # The budget is of failures: calls with a valid token, even 403/404 ones, take nothing.
    operator = TestClient(app, client=("203.0.113.7", 4001), headers=admin)
    for _ in range(5):
        assert operator.get("/api/v1/devices").status_code == 200
        assert operator.post("/api/v1/devices/nope/revoke").status_code == 404
    for _ in range(3):
        assert guesser.post("/api/v1/rounds", json={"cohort": {"all": True}}).status_code == 401
    refused = [guesser.post("/api/v1/rounds", json={"cohort": {"all": True}}), guesser.get("/api/v1/devices"),
               guesser.get("/metrics"), operator.get("/api/v1/devices")]  # the source's budget is spent
    for resp in refused:
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["retry-after"]) >= 1 and "203.0.113.7" in resp.json()["detail"]
    assert guesser.get("/healthz").status_code == 200  # probes stay open
    with server_ctx.factory() as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id).offset(audit_before)))
        assert s.scalar(select(func.count()).select_from(Round)) == 0
    # 5 audited 404s and the 3 failures within the budget; the 429s wrote nothing.
    assert [e.status for e in events] == [404] * 5 + [401] * 3
    # Another source has its own budget; all sources together have 10 times one source's.
    other = TestClient(app, client=("198.51.100.1", 4000))
    assert other.post("/api/v1/rounds", json={}).status_code == 401
    for i in range(26):
        TestClient(app, client=(f"198.51.100.{i + 2}", 4000)).post("/api/v1/rounds", json={})
    assert TestClient(app, client=("192.0.2.1", 1)).post("/api/v1/rounds", json={}).status_code == 429
    with server_ctx.factory() as s:
        total = s.scalar(select(func.count()).select_from(AuditEvent)) - audit_before
    assert total == 5 + 30  # 30 = the global budget: 10 x burst 3
    assert rest_source({"client": ("2001:db8:1:2:3:4:5:6", 1)}) == "2001:db8:1:2::/64"
    assert rest_source({"client": ("::ffff:10.0.0.1", 1)}) == "10.0.0.1"
