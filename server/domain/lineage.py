"""Cohort lineage: which chain of versions (and carried policy state) a round belongs to.

A cohort names a set of devices; its lineage key names the chain of versions trained for
it. Rounds of one lineage build on each other (and run one at a time); rounds of different
lineages are independent, so per-cohort (per-domain) models can coexist as separate heads.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import Device, ModelVersion
from server.domain.errors import InvalidArgumentError

ALL = "all"
DATA_SCOPES = ("cohort", "all")


def lineage_key(cohort: dict) -> str:
    """{"all": true} -> "all"; {"tag": t} -> "tag:<t>"; {"device_ids": [...]} ->
    "devices:<first 16 hex of sha256 of the sorted, de-duplicated ids joined by ','>"."""
    if cohort.get("all") is True and set(cohort) == {"all"}:
        return ALL
    if set(cohort) == {"tag"} and isinstance(cohort["tag"], str) and cohort["tag"]:
        return f"tag:{cohort['tag']}"
    if set(cohort) == {"device_ids"} and isinstance(cohort["device_ids"], list) and cohort["device_ids"]:
        ids = sorted({str(d) for d in cohort["device_ids"]})
        return "devices:" + hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]
    raise InvalidArgumentError("cohort must be {'all': true}, {'device_ids': [...]} or {'tag': '...'}")


def validate_data_scope(scope: str) -> str:
    if scope not in DATA_SCOPES:
        raise InvalidArgumentError(f"data_scope must be one of {DATA_SCOPES}, got {scope!r}")
    return scope


def base_version(session: Session, devices: Iterable[Device], lineage: str) -> ModelVersion | None:
    """The version a cohort runs, which its next round builds on: the version most of its
    devices target (ties: the newest), else the newest version of its lineage, else the
    newest fleet default, else the newest version of all."""
    votes = Counter(d.target_model_hash for d in devices if d.target_model_hash)
    if votes:
        versions = {mv.model_hash: mv for mv in session.scalars(
            select(ModelVersion).where(ModelVersion.model_hash.in_(list(votes))))}
        ranked = sorted(versions.values(), key=lambda mv: (votes[mv.model_hash], mv.number), reverse=True)
        if ranked:
            return ranked[0]
    newest = select(ModelVersion).order_by(ModelVersion.number.desc())
    return (session.scalars(newest.where(ModelVersion.lineage == lineage)).first()
            or session.scalars(newest.where(ModelVersion.fleet_default.is_(True))).first()
            or session.scalars(newest).first())
