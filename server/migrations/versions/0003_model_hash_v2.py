"""model identity v2 (the model hash covers the architecture): issue 8 fault 1

A data migration, no schema change. Every model version was named by the v1 hash (its tensors
only, ``shared.tensors.tensors_hash``); v2 (``shared.models.model_hash``) also covers the
architecture (docs/protocol.md, "Model hash"). In publish order, each version's full artefact
is decoded and verified under v1, re-encoded with its v2 hash and its parent's v2 hash into
the blob store, and every column that names a model hash is rewritten:

* model_versions: ``model_hash`` (the key), ``parent_hash``, ``full_artefact_sha256``;
  ``reinit_seed`` becomes NULL (seeds of the old generator no longer regenerate the weights);
* artefacts: a new row per re-encoded full model; diffs and seed artefacts cannot be re-keyed
  without re-encoding, so they are deleted (devices fetch one full model instead);
* deliveries: moved to the new full artefact with translated hashes; those of deleted
  artefacts are deleted;
* devices: ``model_hash``, ``target_model_hash`` and the ``model_hash`` of each rollback;
* rounds: ``base_model_hash`` and ``model_hash``.

Old blobs stay on disk (a failed migration rolls the database back to rows that name them).
The blob store comes from ``server.db.migrate.upgrade(..., blobs=...)``; with versions in the
database and no blob store the migration refuses. Not reversible: downgrading a database that
holds versions is refused (restore the backup taken before upgrading instead).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:00:00
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FULL_MODEL_ENCODING = "model/safetensors-v1"  # frozen here: the encoding these rows were written with


class MigrationError(RuntimeError):
    """The v1 -> v2 model hash migration cannot run on this database as it stands."""


def _tables(bind: sa.Connection) -> dict[str, sa.Table]:
    meta = sa.MetaData()
    meta.reflect(bind, only=["model_versions", "artefacts", "deliveries", "devices", "rounds"])
    return dict(meta.tables)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # JSON text on SQLite


def upgrade() -> None:
    bind = op.get_bind()
    t = _tables(bind)
    mv, art, dl, dev, rnd = (t[n] for n in ("model_versions", "artefacts", "deliveries", "devices", "rounds"))
    versions = list(bind.execute(sa.select(mv).order_by(mv.c.number)).mappings())
    if not versions:
        return
    blobs = context.config.attributes.get("blobs")
    if blobs is None:
        raise MigrationError(
            f"migration 0003 re-keys {len(versions)} model versions to the v2 model hash and needs "
            "their blobs: run it through `edgeloop server migrate` (or the server's start-up) with "
            "the same data_dir, not bare alembic")
    from shared.artefacts import ArtefactError, decode_v1_full_model, encode_full_model

    new: dict[str, str] = {}  # v1 model hash -> v2
    new_art: dict[str, dict[str, Any]] = {}  # old full artefact sha -> its new row
    for v in versions:
        old_hash, sha = v["model_hash"], v["full_artefact_sha256"]
        try:
            legacy = decode_v1_full_model(blobs.get(sha), max_parameters=1 << 40)
        except (KeyError, OSError, ArtefactError) as exc:
            raise MigrationError(f"version {v['number']} ({old_hash[:16]}): its full artefact {sha[:16]} "
                                 f"is missing or does not verify under the v1 hash: {exc}") from exc
        if legacy.v1_hash != old_hash:
            raise MigrationError(f"version {v['number']}: artefact {sha[:16]} holds model "
                                 f"{legacy.v1_hash[:16]}, not {old_hash[:16]}")
        parent = v["parent_hash"]
        if parent is not None and parent not in new:
            raise MigrationError(f"version {v['number']}: parent {parent[:16]} was not published before it")
        d = legacy.decoded
        assert d.arch is not None
        data, digest = encode_full_model(d.arch, d.state, new[parent] if parent else None, extra=d.meta)
        new[old_hash] = digest
        new_art[sha] = {"sha256": blobs.put(data), "size": len(data), "digest": digest}

    def tr(h: str | None) -> str | None:
        return new.get(h, h) if h else h

    # Artefacts: the new full models first (deliveries and versions will point at them).
    old_rows = {r["sha256"]: r for r in bind.execute(sa.select(art)).mappings()}
    for sha, n in new_art.items():
        row = dict(old_rows[sha])
        row.update(sha256=n["sha256"], size=n["size"], target_model_hash=n["digest"], base_model_hash=None,
                   encoding=FULL_MODEL_ENCODING)
        bind.execute(sa.insert(art).values(**row))
    stale = [sha for sha, r in old_rows.items()
             if sha in new_art or r["base_model_hash"] is not None or r["encoding"] != FULL_MODEL_ENCODING]

    # Deliveries: follow their full model, or go with their diff / seed.
    for sha, n in new_art.items():
        bind.execute(sa.update(dl).where(dl.c.artefact_sha256 == sha).values(artefact_sha256=n["sha256"]))
    if stale:
        bind.execute(sa.delete(dl).where(dl.c.artefact_sha256.in_(stale)))
    for r in list(bind.execute(sa.select(dl.c.id, dl.c.target_model_hash, dl.c.final_model_hash))):
        bind.execute(sa.update(dl).where(dl.c.id == r.id).values(
            target_model_hash=tr(r.target_model_hash), final_model_hash=tr(r.final_model_hash)))

    # Versions: free the old rows' numbers and parent links, insert the new rows in publish
    # order (a parent before its children), then delete the old rows (no foreign key is
    # ever left dangling, so no deferred constraints are needed on either database).
    old_keys = [v["model_hash"] for v in versions]
    bind.execute(sa.update(mv).where(mv.c.model_hash.in_(old_keys)).values(
        number=-1 - mv.c.number, parent_hash=None))
    for v in versions:
        row = dict(v)
        row.update(model_hash=new[v["model_hash"]], parent_hash=tr(v["parent_hash"]),
                   full_artefact_sha256=new_art[v["full_artefact_sha256"]]["sha256"], reinit_seed=None)
        bind.execute(sa.insert(mv).values(**row))
    bind.execute(sa.delete(mv).where(mv.c.model_hash.in_(old_keys)))
    if stale:
        bind.execute(sa.delete(art).where(art.c.sha256.in_(stale)))

    # Plain columns naming a model.
    for r in list(bind.execute(sa.select(dev.c.id, dev.c.model_hash, dev.c.target_model_hash, dev.c.rollbacks))):
        rollbacks = [{**x, "model_hash": tr(x.get("model_hash"))} if isinstance(x, dict) else x
                     for x in (_json(r.rollbacks) or [])]
        bind.execute(sa.update(dev).where(dev.c.id == r.id).values(
            model_hash=tr(r.model_hash), target_model_hash=tr(r.target_model_hash), rollbacks=rollbacks))
    for r in list(bind.execute(sa.select(rnd.c.id, rnd.c.base_model_hash, rnd.c.model_hash))):
        bind.execute(sa.update(rnd).where(rnd.c.id == r.id).values(
            base_model_hash=tr(r.base_model_hash), model_hash=tr(r.model_hash)))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT COUNT(*) FROM model_versions")).scalar_one():
        raise MigrationError("migration 0003 (v2 model hashes) is not reversible on a database with model "
                             "versions: restore the backup taken before the upgrade")
