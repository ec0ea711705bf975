"""Lists that scale (issue 12): every page, count and cohort is cut by the database. The tests
count the ORM rows each call loads (SQLAlchemy's ``loaded_as_persistent`` event) and the SQL
it sends, so a regression to "load every row, slice in Python" fails here; on SQLite and
PostgreSQL (the tag filter is dialect-specific SQL)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event

from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Device, Round
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.errors import NotFoundError

N = 60


@contextmanager
def watched(session):
    """Counts ORM instances loaded by class name, and collects the SQL statements run."""
    loaded: Counter = Counter()
    statements: list[str] = []

    def on_load(_session, instance) -> None:
        loaded[type(instance).__name__] += 1

    def on_sql(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    engine = session.get_bind()
    event.listen(session, "loaded_as_persistent", on_load)
    event.listen(engine, "before_cursor_execute", on_sql)
    try:
        yield loaded, statements
    finally:
        event.remove(session, "loaded_as_persistent", on_load)
        event.remove(engine, "before_cursor_execute", on_sql)


def _tags(i: int) -> list[str]:
    # "site-1" is a prefix of "site-10".."site-19": membership must be exact, never LIKE.
    return sorted({"even" if i % 2 == 0 else "odd", f"site-{i % 12}", *(["rare"] if i % 20 == 3 else [])})


@pytest.fixture
def fleet(server_ctx):
    """N devices registered one second apart (oldest first), device 7 revoked."""
    t0 = utcnow() - timedelta(hours=1)
    with transaction(server_ctx.factory) as s:
        for i in range(N):
            s.add(Device(id=f"dev{i:04d}", hardware_id=f"hw-{i}", credential_hash=f"{i:064x}", tags=_tags(i),
                         created_at=t0 + timedelta(seconds=i), revoked=i == 7))
    return [f"dev{i:04d}" for i in range(N)]


def test_device_pages_and_the_tag_filter_load_only_their_rows(server_ctx, fleet, client):
    with server_ctx.factory() as s, watched(s) as (loaded, sql):
        page, count = D.list_devices(s, offset=10, limit=5)
    assert [d.id for d in page] == fleet[10:15] and count == N
    assert loaded["Device"] == 5
    assert any("count(" in q.lower() for q in sql) and any("limit" in q.lower() for q in sql)
    for tag in ("even", "site-1", "rare", "absent", "EVEN", "a\x00b"):  # "site-1": not site-10, site-11
        want = [d for i, d in enumerate(fleet) if tag in _tags(i)]
        with server_ctx.factory() as s, watched(s) as (loaded, _sql):
            page, count = D.list_devices(s, tag=tag, offset=1, limit=3)
        assert count == len(want) and [d.id for d in page] == want[1:4], tag
        assert loaded["Device"] == len(want[1:4])
    # REST keeps its shape and params.
    body = client.get("/api/v1/devices", params={"tag": "site-1", "offset": 2, "limit": 2}).json()
    want = [d for i, d in enumerate(fleet) if "site-1" in _tags(i)]
    assert body["count"] == len(want) == 5 and [d["id"] for d in body["data"]] == want[2:4]
    body = client.get("/api/v1/devices", params={"offset": N - 1, "limit": 10}).json()
    assert body["count"] == N and [d["id"] for d in body["data"]] == fleet[-1:]


def test_cohorts_read_only_their_devices(server_ctx, fleet):
    rare = [d for i, d in enumerate(fleet) if "rare" in _tags(i) and i != 7]
    with server_ctx.factory() as s, watched(s) as (loaded, _sql):
        got = D.resolve_cohort(s, {"tag": "rare"})
        assert [d.id for d in got] == rare and loaded["Device"] == len(rare)
        assert len(D.resolve_cohort(s, {"all": True})) == N - 1  # the revoked one left out
        ids = [fleet[3], fleet[0], fleet[42]]
        assert [d.id for d in D.resolve_cohort(s, {"device_ids": ids})] == sorted(ids)
        with pytest.raises(NotFoundError):
            D.resolve_cohort(s, {"device_ids": [fleet[1], fleet[7]]})  # revoked
        with pytest.raises(NotFoundError):
            D.resolve_cohort(s, {"device_ids": [fleet[1], "nope"]})

    # Checking a cohort (POST /rounds) counts it without loading a device.
    with server_ctx.factory() as s, watched(s) as (loaded, _sql):
        assert D.check_cohort(s, {"all": True}) == N - 1
        assert D.check_cohort(s, {"tag": "odd"}) == N // 2 - 1  # device 7 is odd and revoked
        assert D.check_cohort(s, {"device_ids": fleet[:3]}) == 3
        with pytest.raises(NotFoundError):
            D.check_cohort(s, {"device_ids": [fleet[7]]})
        assert loaded["Device"] == 0
        rnd = R.create_round(s, method="dpu", cohort={"all": True}, params={})
        assert loaded["Device"] == 0 and rnd.status == R.QUEUED


def test_round_pages_are_stable_and_reports_read_large_cohorts_in_chunks(server_ctx, client):
    at = utcnow()
    with transaction(server_ctx.factory) as s:
        s.add_all([Round(id=f"r{i:03d}", status=R.DONE, method="dpu", lineage=f"l{i}", created_at=at)
                   for i in range(25)])
    seen: list[str] = []
    with server_ctx.factory() as s, watched(s) as (loaded, _sql):
        for offset in range(0, 25, 10):
            seen += [r.id for r in R.list_rounds(s, offset=offset, limit=10)]
        assert R.count_rounds(s) == 25
    assert sorted(seen) == [f"r{i:03d}" for i in range(25)] and len(set(seen)) == 25
    assert loaded["Round"] == 25
    assert client.get("/api/v1/rounds", params={"offset": 20, "limit": 10}).json()["count"] == 25

    # A cohort larger than one IN (...) query: checked, resolved and reported in chunks.
    n = D.COHORT_ID_CHUNK * 2 + 7
    with transaction(server_ctx.factory) as s:
        s.add_all([Device(id=f"big{i:05d}", hardware_id=f"hw-big-{i}", credential_hash=f"b{i:063x}", tags=[])
                   for i in range(n)])
    ids = [f"big{i:05d}" for i in range(n)]
    with transaction(server_ctx.factory) as s:
        assert D.check_cohort(s, {"device_ids": ids}) == n
        assert [d.id for d in D.resolve_cohort(s, {"device_ids": ids})] == ids
        rnd = R.create_round(s, method="dpu", cohort={"device_ids": ids}, params={})
        rnd.model_hash, rnd.device_ids = "a" * 64, ids
        report = R.round_report(s, rnd)
    assert report["devices_total"] == n and len(report["devices"]) == n
