"""Sample ingest (validate, store durably, dedupe), counts, labelling, training-set assembly."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import false, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from server.db.models import Device, Sample
from server.domain.errors import InvalidArgumentError, NotFoundError
from server.store.blobs import BlobStore
from shared.models import ArchSpec
from shared.samples import SampleFormatError, decode_sample, sample_id

MAX_META_ENTRIES = 32
# Float samples reach the model as they are, while uint8 images are scaled to [0, 1]
# (shared.tensors.to_model_input): 1000 leaves three orders of magnitude for unnormalised
# features and refuses the values that blow training up (1e30 gave a loss of 1e27).
SAMPLE_VALUE_ABS_MAX = 1000.0


@dataclass(frozen=True)
class SampleIn:
    sample_id: str
    payload: bytes
    label: int | None
    metadata: dict[str, str]
    captured_at_ms: int = 0


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    committed_ids: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (sample_id, reason)


MAX_LABEL_CLASSES = 1 << 16  # ArchSpec's bound on any width


def label_classes(arch: ArchSpec) -> int:
    """How many classes sample labels may name: the classifier's outputs, except for a p-Meta
    (few-shot) model, whose N outputs are relabelled per task, so its samples carry class ids
    of any number of classes (server/training/pmeta.py builds N-way tasks from them)."""
    return MAX_LABEL_CLASSES if arch.extra.get("pmeta") is not None else arch.num_classes


def check_sample(
    s: SampleIn, arch: ArchSpec, max_bytes: int, value_abs_max: float = SAMPLE_VALUE_ABS_MAX
) -> tuple[str, np.ndarray | None]:
    """Returns ("", array) for a valid sample, or (reason, None). Float values must be finite
    (the decoder refuses NaN and infinity) and within ``[-value_abs_max, value_abs_max]``."""
    if len(s.payload) > max_bytes:
        return f"payload of {len(s.payload)} bytes exceeds {max_bytes}", None
    if sample_id(s.payload) != s.sample_id:
        return "sample_id is not the SHA-256 of the payload", None
    try:
        x = decode_sample(s.payload)
    except SampleFormatError as exc:
        return str(exc), None
    if tuple(x.shape) != arch.input_shape:
        return f"shape {tuple(x.shape)} does not match the fleet model input {arch.input_shape}", None
    if x.dtype.kind == "f" and (peak := float(np.abs(x).max())) > value_abs_max:
        return (f"float sample value of magnitude {peak:.4g} exceeds sample_value_abs_max={value_abs_max:g}"
                " (inputs reach the model unscaled)"), None
    bound = label_classes(arch)
    if s.label is not None and not 0 <= s.label < bound:
        return f"label {s.label} outside [0, {bound})", None
    if len(s.metadata) > MAX_META_ENTRIES or any(len(k) > 64 or len(v) > 256 for k, v in s.metadata.items()):
        return f"metadata: at most {MAX_META_ENTRIES} entries, keys <= 64, values <= 256 chars", None
    return "", x


def ingest_samples(
    session: Session, blobs: BlobStore, device: Device, samples: list[SampleIn], *, arch: ArchSpec, max_bytes: int,
    value_abs_max: float = SAMPLE_VALUE_ABS_MAX,
) -> IngestResult:
    """Validate (:func:`check_sample`) and store samples for ``device``. Blobs are fsynced
    before the rows are added; the caller's transaction commit makes them visible, and only
    then may it acknowledge."""
    result = IngestResult()
    valid: dict[str, tuple[SampleIn, np.ndarray]] = {}
    for s in samples:
        reason, x = check_sample(s, arch, max_bytes, value_abs_max)
        if reason:
            result.rejected.append((s.sample_id, reason))
        elif s.sample_id not in valid:
            valid[s.sample_id] = (s, x)  # type: ignore[assignment]
    if not valid:
        return result
    existing = set(
        session.scalars(
            select(Sample.sample_id).where(Sample.device_id == device.id, Sample.sample_id.in_(list(valid)))
        )
    )
    rows = []
    for sid, (s, x) in valid.items():
        if sid in existing:
            result.duplicates += 1
            continue
        blobs.put(s.payload, expected_sha256=sid)
        captured = datetime.fromtimestamp(s.captured_at_ms / 1000, tz=timezone.utc) if s.captured_at_ms > 0 else None
        rows.append(
            dict(device_id=device.id, sample_id=sid, label=s.label, shape=list(x.shape), dtype=str(x.dtype),
                 size=len(s.payload), meta=dict(s.metadata), captured_at=captured)
        )
    if rows:
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        # A concurrent stream may have inserted the same sample: that is a duplicate, not an error.
        stmt = insert(Sample).values(rows).on_conflict_do_nothing(index_elements=["device_id", "sample_id"])
        session.execute(stmt)
    result.accepted = len(rows)
    result.committed_ids = list(valid)
    return result


def sample_counts(session: Session) -> list[dict]:
    """Counts per (device, label); label None = unlabelled."""
    rows = session.execute(
        select(Sample.device_id, Sample.label, func.count()).group_by(Sample.device_id, Sample.label)
    ).all()
    return [{"device_id": d, "label": label, "count": int(n)} for d, label, n in rows]


def label_samples(session: Session, labels: list[tuple[str, str | None, int]], num_classes: int) -> int:
    """Set labels: ``(sample_id, device_id or None for every device, label)``. Returns rows
    changed. All-or-nothing: an unknown sample or a bad label raises before anything changes."""
    for _sid, _dev, label in labels:
        if not 0 <= label < num_classes:
            raise InvalidArgumentError(f"label {label} outside [0, {num_classes})")
    rows: dict[str, list[Sample]] = {}
    ids = sorted({sid for sid, _, _ in labels})
    for i in range(0, len(ids), 500):  # one query per 500 ids, not one per label
        for row in session.scalars(select(Sample).where(Sample.sample_id.in_(ids[i : i + 500]))):
            rows.setdefault(row.sample_id, []).append(row)
    changed = 0
    for sid, device_id, label in labels:
        found = [r for r in rows.get(sid, []) if device_id in (None, "", r.device_id)]
        if not found:
            raise NotFoundError(f"sample {sid[:16]}... not found")
        for row in found:
            row.label = label
            changed += 1
    return changed


class SampleCache:
    """Decoded payloads by blob hash, so each round does not re-read every file."""

    def __init__(self, blobs: BlobStore, max_items: int = 500_000) -> None:
        self.blobs = blobs
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: str) -> np.ndarray:
        with self._lock:
            hit = self._items.get(sha)
            if hit is not None:
                self._items.move_to_end(sha)
                return hit
        x = decode_sample(self.blobs.get(sha))
        with self._lock:
            self._items[sha] = x
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return x


def is_validation(sample_hash: str, val_fraction: float) -> bool:
    """A sample's split is a pure function of its content hash: it never moves between rounds."""
    return int(sample_hash[:8], 16) / 0xFFFFFFFF < val_fraction


@dataclass(frozen=True)
class LabelledData:
    """Labelled samples split into train / validation, and where each came from.

    ``device_ids_*`` and ``tags_*`` are aligned with ``x_train`` / ``x_val``: the id of the
    device that uploaded the sample and that device's tags when the data was loaded. Data built
    in code may leave them out; they are then filled with "" and () so their length always
    matches.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    device_ids_train: np.ndarray | None = None
    device_ids_val: np.ndarray | None = None
    tags_train: np.ndarray | None = None
    tags_val: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split, n in (("train", len(self.y_train)), ("val", len(self.y_val))):
            if len(getattr(self, f"x_{split}")) != n:
                raise ValueError(f"x_{split} and y_{split} differ in length")
            ids, tags = getattr(self, f"device_ids_{split}"), getattr(self, f"tags_{split}")
            object.__setattr__(self, f"device_ids_{split}", _str_array([""] * n if ids is None else ids))
            object.__setattr__(self, f"tags_{split}", _tags_array([()] * n if tags is None else tags))
            if len(getattr(self, f"device_ids_{split}")) != n or len(getattr(self, f"tags_{split}")) != n:
                raise ValueError(f"device_ids_{split} / tags_{split} must be aligned with x_{split}")

    @property
    def total(self) -> int:
        return len(self.y_train) + len(self.y_val)


def _str_array(values) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(list(values), dtype=np.str_) if len(values) else np.zeros(0, dtype=np.str_)


def _tags_array(values) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty(len(values), dtype=object)  # one tuple of tags per sample
    for i, tags in enumerate(values):
        out[i] = tuple(tags)
    return out


def load_labelled(
    session: Session, cache: SampleCache, arch: ArchSpec, val_fraction: float, *,
    device_ids: Collection[str] | None = None,
) -> LabelledData:
    """Labelled samples (one copy per distinct content and label), split by hash: from every
    device, or only from ``device_ids`` (a round's cohort)."""
    query = select(Sample.sample_id, Sample.label, Sample.device_id).where(Sample.label.is_not(None))
    if device_ids is not None:
        if not device_ids:
            query = query.where(false())
        else:
            query = query.where(Sample.device_id.in_(sorted(set(device_ids))))
    rows = session.execute(query.order_by(Sample.id)).all()
    tags_of = {d: tuple(t or ()) for d, t in session.execute(select(Device.id, Device.tags)).all()}
    seen: set[tuple[str, int]] = set()
    split: dict[bool, tuple[list, list, list, list]] = {False: ([], [], [], []), True: ([], [], [], [])}
    for sid, label, device_id in rows:
        if (sid, label) in seen:
            continue
        seen.add((sid, label))
        x = cache.get(sid)
        if tuple(x.shape) != arch.input_shape:
            continue  # stored under an older architecture
        xs, ys, ids, tags = split[is_validation(sid, val_fraction)]
        xs.append(x)
        ys.append(label)
        ids.append(device_id)
        tags.append(tags_of.get(device_id, ()))

    def stack(xs: list[np.ndarray]) -> np.ndarray:
        if not xs:
            return np.zeros((0, *arch.input_shape), dtype=np.uint8)
        if len({x.dtype for x in xs}) > 1:
            # uint8 images beside float samples: np.stack would promote the images unscaled
            # (0..255), so give each the scale the model sees (shared.tensors.to_model_input).
            xs = [x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x for x in xs]
        return np.stack(xs)

    (xt, yt, it, tt), (xv, yv, iv, tv) = split[False], split[True]
    return LabelledData(stack(xt), np.asarray(yt, dtype=np.int64), stack(xv), np.asarray(yv, dtype=np.int64),
                        device_ids_train=it, device_ids_val=iv, tags_train=tt, tags_val=tv)
