"""Alembic migrations on SQLite and PostgreSQL: they build exactly the schema the ORM models
describe, are idempotent, and downgrade cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from server.db import (
    migrate,
    models,  # noqa: F401 - registers the tables on Base.metadata
)
from server.db.base import Base
from server.db.engine import make_engine

TABLES = {"devices", "samples", "artefacts", "model_versions", "rounds", "deliveries", "policy_states"}


def _schema_diff(engine) -> list:
    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        return compare_metadata(mc, Base.metadata)


def test_upgrade_matches_models_then_downgrade(db_url):
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert _schema_diff(engine) == []
        with engine.connect() as conn:
            head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert head == ScriptDirectory.from_config(migrate.alembic_config(db_url)).get_current_head()

        migrate.upgrade(engine)  # idempotent: already at head
        assert _schema_diff(engine) == []

        migrate.downgrade(engine, "base")
        left = set(inspect(engine).get_table_names())
        assert not (left & TABLES), left
        # ...and back up again from nothing.
        migrate.upgrade(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_migrated_schema_enforces_the_constraints(db_url):
    """The unique and foreign-key constraints the domain layer relies on exist in the database."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        device = dict(id="d1", hardware_id="hw", name="", tags="[]", hardware="{}", agent_version="",
                      credential_hash="c" * 64, revoked=False, created_at="2026-01-01T00:00:00+00:00",
                      model_hash="", target_model_hash="", active_subnet=-1, budget="{}", metrics="{}",
                      state="registered", last_error="", samples_pending=0)
        cols = ", ".join(device)
        vals = ", ".join(f":{k}" for k in device)
        insert_device = text(f"INSERT INTO devices ({cols}) VALUES ({vals})")
        sample = dict(device_id="d1", sample_id="s" * 64, shape="[]", dtype="uint8", size=1, metadata="{}",
                      received_at="2026-01-01T00:00:00+00:00")
        insert_sample = text(f"INSERT INTO samples ({', '.join(sample)}) VALUES ({', '.join(':' + k for k in sample)})")
        with engine.begin() as conn:
            conn.execute(insert_device, device)
            conn.execute(insert_sample, sample)
        with pytest.raises(IntegrityError):  # (device_id, sample_id) is unique
            with engine.begin() as conn:
                conn.execute(insert_sample, sample)
        with pytest.raises(IntegrityError):  # hardware_id is unique
            with engine.begin() as conn:
                conn.execute(insert_device, {**device, "id": "d2", "credential_hash": "d" * 64})
        with pytest.raises(IntegrityError):  # samples reference devices
            with engine.begin() as conn:
                conn.execute(insert_sample, {**sample, "device_id": "nope"})
    finally:
        engine.dispose()


def test_0002_keeps_existing_rows_and_downgrades_to_0001(db_url):
    """Rows written under 0001 get the defaults of the new columns; rounds left running (here
    two, which the one-running-round-per-lineage index would refuse) are failed; a downgrade
    to 0001 drops only what 0002 added."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0001")
        rnd = dict(reason="", method="full", cohort='{"all": true}', params="{}", progress=0.0,
                   progress_message="", metrics="{}", device_ids="[]", created_at="2026-01-01T00:00:00+00:00")
        insert_round = text(f"INSERT INTO rounds (id, status, {', '.join(rnd)}) "
                            f"VALUES (:id, :status, {', '.join(':' + k for k in rnd)})")
        device = dict(id="d1", hardware_id="hw", name="", tags="[]", hardware="{}", agent_version="",
                      credential_hash="c" * 64, revoked=False, created_at="2026-01-01T00:00:00+00:00",
                      model_hash="", target_model_hash="", active_subnet=-1, budget="{}", metrics="{}",
                      state="idle", last_error="", samples_pending=0)
        with engine.begin() as conn:
            for rid, status in (("r-done", "done"), ("r-train", "training"), ("r-pub", "publishing")):
                conn.execute(insert_round, {**rnd, "id": rid, "status": status})
            conn.execute(text(f"INSERT INTO devices ({', '.join(device)}) VALUES ({', '.join(':' + k for k in device)})"),
                         device)
        migrate.upgrade(engine)
        assert _schema_diff(engine) == []
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(text("SELECT * FROM rounds"))}
            rollbacks = conn.execute(text("SELECT rollbacks FROM devices")).scalar_one()
        assert {k: (r.status, r.lineage, r.data_scope, r.worker_id) for k, r in rows.items()} == {
            "r-done": ("done", "all", "cohort", ""), "r-train": ("failed", "all", "cohort", ""),
            "r-pub": ("failed", "all", "cohort", "")}
        assert "upgraded" in rows["r-train"].reason and rows["r-train"].finished_at is not None
        assert rollbacks in ("[]", [])  # JSON text on SQLite, decoded on PostgreSQL
        with engine.begin() as conn:  # the partial index: one running round per lineage
            conn.execute(text("UPDATE rounds SET status = 'training' WHERE id = 'r-train'"))
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(text("UPDATE rounds SET status = 'publishing' WHERE id = 'r-pub'"))

        migrate.downgrade(engine, "0001")
        insp = inspect(engine)
        assert "policy_states" not in insp.get_table_names()
        assert {c["name"] for c in insp.get_columns("rounds")} == {"id", "status", *rnd, "base_model_hash",
                                                                   "model_hash", "started_at", "finished_at"}
        assert "lineage" not in {c["name"] for c in insp.get_columns("model_versions")}
        assert "rollbacks" not in {c["name"] for c in insp.get_columns("devices")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM rounds")).scalar_one() == 3
            assert conn.execute(text("SELECT state FROM devices")).scalar_one() == "idle"
    finally:
        engine.dispose()
