"""Model versions, artefacts and the choice of what to send a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sqlalchemy import func, literal, or_, select, text
from sqlalchemy.orm import Session, aliased

from server.db.models import Artefact, ModelVersion
from server.domain.errors import NotFoundError
from server.signing import sign_new_artefact
from server.store.blobs import BlobStore
from shared.artefacts import (
    FULL_MODEL_ENCODING,
    SEED_MODEL_ENCODING,
    ArtefactError,
    decode_artefact,
    encode_full_model,
    encode_seed_model,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed


def get_version(session: Session, model_hash: str) -> ModelVersion:
    mv = session.get(ModelVersion, model_hash)
    if mv is None:
        raise NotFoundError(f"model version {model_hash[:16]!r} not found")
    return mv


def latest_version(session: Session, lineage: str | None = None) -> ModelVersion | None:
    """The newest version of all, or of one lineage (each lineage has its own head)."""
    q = select(ModelVersion).order_by(ModelVersion.number.desc())
    if lineage is not None:
        q = q.where(ModelVersion.lineage == lineage)
    return session.scalars(q).first()


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.number)))


def load_state(session: Session, blobs: BlobStore, model_hash: str) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    mv = get_version(session, model_hash)
    decoded = decode_artefact(blobs.get(mv.full_artefact_sha256), encoding=FULL_MODEL_ENCODING)
    if decoded.model_hash != mv.model_hash:  # the hash covers the architecture: this pins both
        raise ArtefactError(f"version {mv.number}'s artefact holds model {decoded.model_hash[:16]}, "
                            f"not {mv.model_hash[:16]}")
    return ArchSpec.from_json(mv.arch_json), decoded.state


PUBLISH_LOCK_KEY = 0x65646765_6C6F6F70 & 0x7FFFFFFFFFFFFFFF  # "edgeloop": one key for every publisher


def lock_publishing(session: Session) -> None:
    """Serialise publishers until this transaction ends, so concurrent workers never pick
    the same version number. PostgreSQL: a transaction-scoped advisory lock (re-entrant);
    SQLite has a single writer already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PUBLISH_LOCK_KEY})


def add_artefact(
    session: Session, blobs: BlobStore, data: bytes, *, encoding: str, target_hash: str, base_hash: str | None = None
) -> Artefact:
    sha = blobs.put(data)
    art = session.get(Artefact, sha)
    if art is None:
        art = Artefact(sha256=sha, encoding=encoding, size=len(data), base_model_hash=base_hash, target_model_hash=target_hash)
        session.add(art)
        session.flush()
    sign_new_artefact(session, art)  # in this transaction, from the row: never from the blob read back
    return art


def add_seed_artefact(session: Session, blobs: BlobStore, arch: ArchSpec, seed: int, model_hash: str) -> Artefact:
    """The ``model/seed-v2`` artefact that regenerates version ``model_hash`` from ``seed``
    (DPU §5.4.2; docs/seed-format.md). It is decoded here first, exactly as a device will:
    a seed whose weights are not that version (raises ArtefactError) is never published."""
    data = encode_seed_model(arch, seed, model_hash)
    decode_artefact(data, encoding=SEED_MODEL_ENCODING)
    return add_artefact(session, blobs, data, encoding=SEED_MODEL_ENCODING, target_hash=model_hash)


def publish_version(
    session: Session,
    blobs: BlobStore,
    *,
    arch: ArchSpec,
    state: dict[str, torch.Tensor],
    parent_hash: str | None,
    method: str,
    metrics: dict,
    round_id: str | None = None,
    reinit_seed: int | None = None,
    fleet_default: bool = False,
    lineage: str = "all",
) -> ModelVersion:
    """Store the full-model artefact and the version row (idempotent on the model hash: a
    version keeps the lineage that first published it)."""
    lock_publishing(session)
    data, digest = encode_full_model(arch, state, parent_hash)
    existing = session.get(ModelVersion, digest)
    if existing is not None:
        existing.fleet_default = existing.fleet_default or fleet_default
        return existing
    art = add_artefact(session, blobs, data, encoding=FULL_MODEL_ENCODING, target_hash=digest)
    top = session.scalar(select(func.max(ModelVersion.number)))
    number = 0 if top is None else top + 1
    mv = ModelVersion(
        model_hash=digest, number=number, parent_hash=parent_hash, arch_json=arch.to_json(),
        full_artefact_sha256=art.sha256, round_id=round_id, method=method, metrics=metrics,
        reinit_seed=reinit_seed, fleet_default=fleet_default, lineage=lineage,
    )
    session.add(mv)
    session.flush()
    return mv


def ensure_initial_version(session: Session, blobs: BlobStore, arch: ArchSpec, seed: int) -> ModelVersion:
    """Version 0: the untrained model from ``seed``, so a fresh fleet has something to run."""
    current = latest_version(session)
    if current is not None:
        return current
    model = init_weights_from_seed(build_model(arch), seed)
    return publish_version(
        session, blobs, arch=arch, state=model.state_dict(), parent_hash=None, method="init",
        metrics={}, reinit_seed=seed, fleet_default=True,
    )


@dataclass(frozen=True)
class UpdatePlan:
    """The next artefact to send; ``final_hash`` is where the chain ends."""

    artefact: Artefact
    final_hash: str
    chain_bytes: int  # total bytes of the whole remaining path


MAX_ANCESTRY = 256  # versions walked up from the target; older ones are reached by the full model


def ancestry(session: Session, target: str, max_depth: int = MAX_ANCESTRY) -> list[str]:
    """``target`` and its ancestors (parent links), nearest first: one recursive query."""
    up = select(ModelVersion.model_hash, ModelVersion.parent_hash, literal(0).label("depth")).where(
        ModelVersion.model_hash == target).cte("ancestry", recursive=True)
    parent = aliased(ModelVersion)
    up = up.union_all(select(parent.model_hash, parent.parent_hash, up.c.depth + 1)
                      .where(parent.model_hash == up.c.parent_hash, up.c.depth < max_depth))
    return list(session.scalars(select(up.c.model_hash).order_by(up.c.depth)))


def _diff_path(session: Session, have: str, target: str, max_hops: int = 32) -> list[Artefact] | None:
    """Fewest-bytes chain from ``have`` to ``target`` over diff artefacts (edges base -> target)
    and seed artefacts (a re-initialisation, reachable from any model: DPU §5.4.2).

    Only the target's ancestry is searched: every artefact the worker publishes leads to a
    version from one of its ancestors (a diff's base is the version the round trained from,
    or the re-initialised version in between; a seed's target is that version), so the last
    edge of any chain ends at ``target`` and, edge by edge backwards, every edge ends on the
    ancestry. One indexed query (ix_artefacts_target_model_hash) reads just those artefacts,
    however many other versions and diffs the fleet has."""
    path = ancestry(session, target)
    if not path:
        return None
    candidates = list(session.scalars(select(Artefact).where(
        Artefact.target_model_hash.in_(path),
        or_(Artefact.base_model_hash.is_not(None), Artefact.encoding == SEED_MODEL_ENCODING))))
    diffs = [a for a in candidates if a.base_model_hash is not None]
    seeds = [a for a in candidates if a.encoding == SEED_MODEL_ENCODING]
    edges: dict[str, list[Artefact]] = {}
    for a in diffs:
        edges.setdefault(a.base_model_hash or "", []).append(a)
    best: dict[str, tuple[int, list[Artefact]]] = {have: (0, [])}
    frontier = [have]
    for a in seeds:
        if a.target_model_hash != have and (a.target_model_hash not in best or a.size < best[a.target_model_hash][0]):
            best[a.target_model_hash] = (a.size, [a])
            frontier.append(a.target_model_hash)
    for _ in range(max_hops):
        nxt = []
        for node in frontier:
            cost, chain = best[node]
            for a in edges.get(node, []):
                c = cost + a.size
                if a.target_model_hash not in best or c < best[a.target_model_hash][0]:
                    best[a.target_model_hash] = (c, [*chain, a])
                    nxt.append(a.target_model_hash)
        frontier = nxt
        if not frontier:
            break
    return best[target][1] if target in best and target != have else None


def plan_update(session: Session, *, have_hash: str, target_hash: str) -> UpdatePlan:
    """A chain of diffs from what the device has, or the full model, whichever is fewer bytes.
    ``have_hash == target_hash`` plans the full model too: the gRPC servicer answers that case
    "up to date" before asking (docs/protocol.md)."""
    mv = get_version(session, target_hash)
    full = session.get(Artefact, mv.full_artefact_sha256)
    assert full is not None
    path = _diff_path(session, have_hash, target_hash) if have_hash else None
    if path:
        chain = sum(a.size for a in path)
        if chain < full.size:
            return UpdatePlan(path[0], target_hash, chain)
    return UpdatePlan(full, target_hash, full.size)
