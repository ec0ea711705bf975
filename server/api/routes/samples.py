"""Samples: counts, listing, and labelling (the operator's side of data collection)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from server.api.deps import CtxDep, SessionDep, require_scope
from server.api.errors import responses
from server.api.pagination import DEFAULT_LIMIT, LimitParam, SampleOffset
from server.api.schemas import (
    DeviceSampleCounts,
    LabelsUpdate,
    LabelsUpdated,
    SampleCountsPublic,
    SamplePublic,
    SamplesPublic,
)
from server.db.models import Sample
from server.domain.samples import label_classes, label_samples, sample_counts

router = APIRouter(prefix="/samples", tags=["samples"], responses=responses(401, 422))


@router.get("/counts", response_model=SampleCountsPublic, dependencies=[require_scope("read")])
def get_sample_counts(session: SessionDep) -> SampleCountsPublic:
    """Samples per device and per label, and the labelled / unlabelled totals."""
    per_device: dict[str, DeviceSampleCounts] = {}
    for row in sample_counts(session):
        c = per_device.setdefault(
            row["device_id"], DeviceSampleCounts(device_id=row["device_id"], labelled=0, unlabelled=0, by_label={})
        )
        if row["label"] is None:
            c.unlabelled += row["count"]
        else:
            c.labelled += row["count"]
            c.by_label[row["label"]] = c.by_label.get(row["label"], 0) + row["count"]
    devices = [per_device[k] for k in sorted(per_device)]
    for c in devices:
        c.by_label = dict(sorted(c.by_label.items()))
    labelled = sum(c.labelled for c in devices)
    unlabelled = sum(c.unlabelled for c in devices)
    return SampleCountsPublic(devices=devices, labelled=labelled, unlabelled=unlabelled, total=labelled + unlabelled)


@router.get("", response_model=SamplesPublic, dependencies=[require_scope("read")])
def list_samples(
    session: SessionDep,
    device_id: Annotated[str | None, Query(max_length=32, description="Only this device's samples.")] = None,
    labelled: Annotated[bool | None, Query(description="true: only labelled; false: only unlabelled.")] = None,
    offset: SampleOffset = 0,
    limit: LimitParam = DEFAULT_LIMIT,
) -> SamplesPublic:
    """Sample records (ids, labels, shapes, metadata; not the payloads), oldest first."""
    where = []
    if device_id is not None:
        where.append(Sample.device_id == device_id)
    if labelled is not None:
        where.append(Sample.label.is_not(None) if labelled else Sample.label.is_(None))
    count = session.scalar(select(func.count()).select_from(Sample).where(*where)) or 0
    rows = session.scalars(select(Sample).where(*where).order_by(Sample.id).offset(offset).limit(limit))
    return SamplesPublic(data=[SamplePublic.model_validate(r) for r in rows], count=count)


@router.post("/labels", response_model=LabelsUpdated, responses=responses(404, 413), dependencies=[require_scope("operate")])
def set_labels(body: LabelsUpdate, session: SessionDep, ctx: CtxDep) -> LabelsUpdated:
    """Set labels in one transaction: an unknown sample or a label out of range changes nothing."""
    n = label_samples(
        session, [(x.sample_id, x.device_id, x.label) for x in body.labels], label_classes(ctx.settings.arch)
    )
    session.commit()
    return LabelsUpdated(updated=n)
