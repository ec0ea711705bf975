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
from server.domain.devices import TAG
from server.domain.errors import InvalidArgumentError
from server.domain.versions import latest_version

ALL = "all"
DATA_SCOPES = ("cohort", "all")


def validate_cohort(cohort: dict) -> dict:
    """The cohort in its one stored form (device ids sorted and de-duplicated)."""
    keys = set(cohort)
    if keys == {"all"} and cohort["all"] is True:
        return {"all": True}
    if keys == {"device_ids"} and isinstance(cohort["device_ids"], list) and cohort["device_ids"]:
        if not all(isinstance(d, str) for d in cohort["device_ids"]) or len(cohort["device_ids"]) > 10_000:
            raise InvalidArgumentError("cohort.device_ids must be a list of up to 10000 device id strings")
        return {"device_ids": sorted(set(cohort["device_ids"]))}
    if keys == {"tag"} and isinstance(cohort["tag"], str) and TAG.match(cohort["tag"]):  # as devices' tags
        return {"tag": cohort["tag"]}
    raise InvalidArgumentError("cohort must be {'all': true}, {'device_ids': [...]} or {'tag': '...'}")


def lineage_key(cohort: dict) -> str:
    """{"all": true} -> "all"; {"tag": t} -> "tag:<t>"; {"device_ids": [...]} ->
    "devices:<first 16 hex of sha256 of the sorted, de-duplicated ids joined by ','>"."""
    cohort = validate_cohort(cohort)
    if "all" in cohort:
        return ALL
    if "tag" in cohort:
        return f"tag:{cohort['tag']}"
    return "devices:" + hashlib.sha256(",".join(cohort["device_ids"]).encode()).hexdigest()[:16]


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
    fleet_default = (select(ModelVersion).where(ModelVersion.fleet_default.is_(True))
                     .order_by(ModelVersion.number.desc()))
    return (latest_version(session, lineage) or session.scalars(fleet_default).first()
            or latest_version(session))
