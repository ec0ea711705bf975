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


def test_0005_adds_enrollment_tokens_and_downgrades_to_0004(db_url):
    """0005 creates the enrollment tables (hash unique, enrollments cascade with their token)
    and touches nothing else; a downgrade to 0004 drops only them."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0004")
        before = set(inspect(engine).get_table_names())
        assert not {"enrollment_tokens", "enrollments"} & before
        migrate.upgrade(engine, "0005")
        assert set(inspect(engine).get_table_names()) == before | {"enrollment_tokens", "enrollments"}
        token = dict(id="t1", name="n", secret_hash="a" * 64, tags="[]", max_uses=1, uses=0,
                     created_at="2026-01-01T00:00:00+00:00", expires_at="2026-01-02T00:00:00+00:00")
        insert = text(f"INSERT INTO enrollment_tokens ({', '.join(token)}) VALUES ({', '.join(':' + k for k in token)})")
        enrolled = text("INSERT INTO enrollments (token_id, hardware_id, created_at) "
                        "VALUES (:t, 'hw', '2026-01-01T00:00:00+00:00')")
        with engine.begin() as conn:
            conn.execute(insert, token)
            conn.execute(enrolled, {"t": "t1"})
            # a token made without saying so is an ordinary one (no re-enrolling other devices)
            assert conn.execute(text("SELECT reenroll FROM enrollment_tokens")).scalar_one() in (False, 0)
        with pytest.raises(IntegrityError):  # the secret hash is unique
            with engine.begin() as conn:
                conn.execute(insert, {**token, "id": "t2"})
        with pytest.raises(IntegrityError):  # enrollments reference tokens
            with engine.begin() as conn:
                conn.execute(enrolled, {"t": "nope"})
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text("PRAGMA foreign_keys=ON"))
            conn.execute(text("DELETE FROM enrollment_tokens WHERE id = 't1'"))
            assert conn.execute(text("SELECT count(*) FROM enrollments")).scalar_one() == 0  # cascaded
        migrate.downgrade(engine, "0004")
        assert set(inspect(engine).get_table_names()) == before
    finally:
        engine.dispose()


def test_0004_adds_operator_tokens_and_audit_and_downgrades_to_0003(db_url):
    """0004 creates the operator token and audit tables (token hash unique) and touches
    nothing else; a downgrade to 0003 drops only them."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0003")
        before = set(inspect(engine).get_table_names())
        assert not {"operator_tokens", "audit_events"} & before
        migrate.upgrade(engine, "0004")
        assert set(inspect(engine).get_table_names()) == before | {"operator_tokens", "audit_events"}
        token = dict(id="t1", name="ci", scope="read", secret_hash="a" * 64, created_by="cli",
                     created_at="2026-01-01T00:00:00+00:00")
        insert = text(f"INSERT INTO operator_tokens ({', '.join(token)}) VALUES ({', '.join(':' + k for k in token)})")
        with engine.begin() as conn:
            conn.execute(insert, token)
            conn.execute(text("INSERT INTO audit_events (at, token_name, method, path, action, target, detail) "
                              "VALUES ('2026-01-01T00:00:00+00:00', 'ci', 'POST', '/api/v1/rounds', '', '', '')"))
        with pytest.raises(IntegrityError):  # one row per secret
            with engine.begin() as conn:
                conn.execute(insert, {**token, "id": "t2"})
        migrate.downgrade(engine, "0003")
        assert set(inspect(engine).get_table_names()) == before
        migrate.upgrade(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def _v1_fleet(engine, blobs):
    """At revision 0002: two versions published under the v1 model hash (v0 seeded, v1 its
    child), a diff and a seed artefact, a device that runs v0 and should run v1 (with a rollback
    report), another device, their deliveries and the round that made v1."""
    from datetime import UTC, datetime

    import sqlalchemy as sa

    from shared.models import ArchSpec, build_model, init_weights_from_seed
    from tests.legacy_identity import v1_full_artefact

    arch = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,))
    states = [{k: v.detach().clone() for k, v in init_weights_from_seed(build_model(arch), s).state_dict().items()}
              for s in (0, 1)]
    full0, h0 = v1_full_artefact(arch, states[0])
    full1, h1 = v1_full_artefact(arch, states[1], h0, extra={"round": "r1"})
    sha0, sha1 = blobs.put(full0), blobs.put(full1)
    sha_diff, sha_seed = blobs.put(b"ELDF\x01\x00 a v1 diff"), blobs.put(b'ELSEED1\n{"seed":7}')
    now = datetime(2026, 1, 1, tzinfo=UTC)
    meta = sa.MetaData()
    meta.reflect(engine)
    t = meta.tables
    device = dict(name="", tags=[], hardware={}, agent_version="", revoked=False, created_at=now,
                  active_subnet=-1, budget={}, metrics={}, state="idle", last_error="", samples_pending=0)
    rnd = dict(reason="", method="dpu", cohort={"all": True}, params={}, progress=1.0, progress_message="",
               metrics={}, device_ids=["d1"], created_at=now)
    with engine.begin() as conn:
        conn.execute(sa.insert(t["artefacts"]), [
            dict(sha256=sha0, encoding="model/safetensors-v1", size=len(full0), base_model_hash=None,
                 target_model_hash=h0, created_at=now),
            dict(sha256=sha1, encoding="model/safetensors-v1", size=len(full1), base_model_hash=None,
                 target_model_hash=h1, created_at=now),
            dict(sha256=sha_diff, encoding="diff/sparse-v1", size=20, base_model_hash=h0, target_model_hash=h1,
                 created_at=now),
            dict(sha256=sha_seed, encoding="model/seed-v1", size=18, base_model_hash=None, target_model_hash=h0,
                 created_at=now)])
        conn.execute(sa.insert(t["model_versions"]), [
            dict(model_hash=h0, number=0, parent_hash=None, arch_json=arch.to_json(), full_artefact_sha256=sha0,
                 round_id=None, method="init", metrics={}, reinit_seed=7, fleet_default=True, lineage="all",
                 created_at=now)])
        conn.execute(sa.insert(t["model_versions"]), [
            dict(model_hash=h1, number=1, parent_hash=h0, arch_json=arch.to_json(), full_artefact_sha256=sha1,
                 round_id="r1", method="dpu", metrics={"val_accuracy": 0.5}, reinit_seed=None, fleet_default=True,
                 lineage="all", created_at=now)])
        conn.execute(sa.insert(t["devices"]), [
            dict(id="d1", hardware_id="hw1", credential_hash="c" * 64, model_hash=h0, target_model_hash=h1,
                 rollbacks=[{"model_hash": h1, "reason": "worse", "at_ms": 5}], **device),
            dict(id="d2", hardware_id="hw2", credential_hash="d" * 64, model_hash="", target_model_hash=h1,
                 rollbacks=[], **device)])
        conn.execute(sa.insert(t["deliveries"]), [
            dict(device_id="d1", artefact_sha256=sha1, target_model_hash=h1, final_model_hash=h1, bytes_sent=9,
                 completed=True, started_at=now, updated_at=now),
            dict(device_id="d2", artefact_sha256=sha_diff, target_model_hash=h1, final_model_hash=h1,
                 bytes_sent=3, completed=False, started_at=now, updated_at=now)])
        conn.execute(sa.insert(t["rounds"]), [dict(id="r1", status="done", base_model_hash=h0, model_hash=h1,
                                                     lineage="all", **rnd)])
    return arch, states, (h0, h1)


def test_0003_rekeys_a_v1_fleet_to_the_v2_model_hash(db_url, tmp_path):
    """Issue 8 fault 1: versions published under the v1 hash (tensors only) are re-encoded
    under v2 (architecture + tensors), and every column naming a model follows."""
    import json

    import sqlalchemy as sa

    from server.store.blobs import BlobStore
    from shared.artefacts import FULL_MODEL_ENCODING, decode_artefact
    from shared.models import model_hash

    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0002")
        blobs = BlobStore(tmp_path / "blobs", fsync=False)
        arch, states, (h0, h1) = _v1_fleet(engine, blobs)
        with pytest.raises(Exception, match="needs their blobs"):  # bare alembic: no blob store
            migrate.upgrade(engine)
        with engine.connect() as conn:  # refused as a whole: still at 0002 with v1 rows
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0002"
            assert conn.execute(text("SELECT count(*) FROM model_versions WHERE model_hash = :h"),
                                {"h": h1}).scalar_one() == 1

        migrate.upgrade(engine, blobs=blobs)
        assert _schema_diff(engine) == []
        n0, n1 = (model_hash(arch, s) for s in states)
        assert {h0, h1}.isdisjoint({n0, n1})

        def rows(sql: str) -> list:
            with engine.connect() as conn:
                return list(conn.execute(text(sql)).mappings())

        versions = rows("SELECT * FROM model_versions ORDER BY number")
        assert [(v["model_hash"], v["number"], v["parent_hash"], v["reinit_seed"], v["method"]) for v in versions] == [
            (n0, 0, None, None, "init"), (n1, 1, n0, None, "dpu")]
        assert [v["metrics"] if isinstance(v["metrics"], dict) else json.loads(v["metrics"]) for v in versions] == [
            {}, {"val_accuracy": 0.5}]
        for v in versions:  # each full artefact decodes, under v2, to its version
            decoded = decode_artefact(blobs.get(v["full_artefact_sha256"]))
            assert decoded.model_hash == v["model_hash"] and decoded.arch == arch
            assert decoded.parent_hash == v["parent_hash"]
        assert decode_artefact(blobs.get(versions[1]["full_artefact_sha256"])).meta == {"round": "r1"}
        arts = rows("SELECT * FROM artefacts")  # the diff and the seed artefact are gone
        assert sorted((a["target_model_hash"], a["encoding"], a["base_model_hash"]) for a in arts) == sorted(
            [(n0, FULL_MODEL_ENCODING, None), (n1, FULL_MODEL_ENCODING, None)])
        assert {a["sha256"] for a in arts} == {v["full_artefact_sha256"] for v in versions}
        assert all(a["size"] == blobs.size(a["sha256"]) for a in arts)
        devices = {d["id"]: d for d in rows("SELECT * FROM devices")}
        assert (devices["d1"]["model_hash"], devices["d1"]["target_model_hash"]) == (n0, n1)
        assert (devices["d2"]["model_hash"], devices["d2"]["target_model_hash"]) == ("", n1)
        rollbacks = devices["d1"]["rollbacks"]
        rollbacks = json.loads(rollbacks) if isinstance(rollbacks, str) else rollbacks
        assert rollbacks == [{"model_hash": n1, "reason": "worse", "at_ms": 5}]
        deliveries = rows("SELECT * FROM deliveries")  # the diff's delivery went with the diff
        assert [(d["device_id"], d["artefact_sha256"], d["target_model_hash"], d["final_model_hash"], d["bytes_sent"])
                for d in deliveries] == [("d1", versions[1]["full_artefact_sha256"], n1, n1, 9)]
        assert [(r["base_model_hash"], r["model_hash"]) for r in rows("SELECT * FROM rounds")] == [(n0, n1)]
        with engine.begin() as conn:  # the foreign keys hold: a version must name a real parent
            if engine.dialect.name == "sqlite":
                conn.execute(text("PRAGMA foreign_keys=ON"))
            bad = sa.text("UPDATE model_versions SET parent_hash = :h WHERE number = 1")
            with pytest.raises(IntegrityError):
                with conn.begin_nested():
                    conn.execute(bad, {"h": h0})
    finally:
        engine.dispose()


def test_the_server_migrates_a_v1_data_dir_at_start_up(tmp_path):
    """ServerContext.open passes its blob store to the migrations: a v1 deployment starts,
    its devices' targets are v2 hashes of versions that exist."""
    from server.context import ServerContext
    from server.settings import ServerSettings
    from server.store.blobs import BlobStore
    from shared.models import ArchSpec, model_hash

    settings = ServerSettings(data_dir=tmp_path / "server",
                              model_arch_json=ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,)).to_json())
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        migrate.upgrade(engine, "0002")
        arch, states, _ = _v1_fleet(engine, BlobStore(settings.data_dir / "blobs"))
    finally:
        engine.dispose()
    ctx = ServerContext.open(settings)
    try:
        with ctx.engine.connect() as conn:
            target = conn.execute(text("SELECT target_model_hash FROM devices WHERE id = 'd1'")).scalar_one()
            known = {r[0] for r in conn.execute(text("SELECT model_hash FROM model_versions"))}
        assert target == model_hash(arch, states[1]) and target in known
    finally:
        ctx.close()
