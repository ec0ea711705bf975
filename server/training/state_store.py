"""Carried policy state in the database, read and written in the round's transactions.

One row of ``policy_states`` per (lineage, method): the JSON half of
:meth:`PolicyState.to_record` in ``meta``, its tensors as one safetensors blob in the
BlobStore (``tensors_sha256``), the policy's ``SCHEMA`` and a ``generation`` that grows by
one at every save. A round reads (state, generation) when it starts and saves with the
generation it read: if another worker saved in between, the save raises
:class:`StateConflictError` and the round fails rather than mixing two chains of state.

Garbage: a save returns the blob it superseded; the caller deletes it with
:func:`collect_garbage` after the commit (row first, then blob: a crash in between leaves an
orphan blob, which is harmless; never a row that names a missing blob).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.db.base import utcnow
from server.db.models import PolicyStateRecord
from server.domain.errors import ConflictError
from server.store.blobs import BlobNotFoundError, BlobStore
from server.training.policy import PolicyState

S = TypeVar("S", bound=PolicyState)
_BLOB_TAG = "edgeloop.policy_state"  # safetensors metadata: these bytes are a policy state


class StateConflictError(ConflictError):
    """Another round saved this lineage's state after this round read it."""


@dataclass(frozen=True)
class SavedState:
    generation: int
    tensors_sha256: str | None
    superseded: str | None  # the previous blob, to delete after the commit (None: nothing)


def _row(session: Session, lineage: str, method: str, *, for_update: bool = False) -> PolicyStateRecord | None:
    q = select(PolicyStateRecord).where(PolicyStateRecord.lineage == lineage, PolicyStateRecord.method == method)
    if for_update:
        q = q.with_for_update()
    return session.scalars(q.execution_options(populate_existing=True)).first()


def load_state(
    session: Session, blobs: BlobStore, lineage: str, method: str, state_cls: type[S]
) -> tuple[S | None, int, str]:
    """(state or None, generation read, note). A record this server cannot use (another
    schema, a missing or corrupt blob, a record ``from_record`` refuses) is not an error:
    the policy starts without carried state and the note says why, for the round metrics."""
    row = _row(session, lineage, method)
    if row is None:
        return None, 0, ""
    where = f"the carried {method} state of lineage {lineage!r} (generation {row.generation})"
    if row.meta is None:
        return None, row.generation, ""  # cleared by the last round
    if row.schema != state_cls.SCHEMA:
        return None, row.generation, (f"{where} has schema {row.schema}, this server reads schema "
                                      f"{state_cls.SCHEMA}: starting without it")
    tensors: dict[str, torch.Tensor] = {}
    if row.tensors_sha256:
        try:
            data = blobs.get(row.tensors_sha256)
            if hashlib.sha256(data).hexdigest() != row.tensors_sha256:
                raise ValueError("its tensors blob does not match its hash")
            tensors = st_load(data)
        except BlobNotFoundError:
            return None, row.generation, f"{where}: tensors blob {row.tensors_sha256[:12]} is missing; starting without it"
        except (ValueError, SafetensorError) as exc:
            return None, row.generation, f"{where} is unreadable ({exc}); starting without it"
    try:
        state = state_cls.from_record(row.meta, tensors)
    except (ValueError, KeyError, TypeError) as exc:
        return None, row.generation, f"{where} was refused ({type(exc).__name__}: {exc}); starting without it"
    if not isinstance(state, state_cls):
        return None, row.generation, f"{where}: from_record returned a {type(state).__name__}; starting without it"
    return state, row.generation, ""


def _encode(state: PolicyState, method: str, lineage: str, generation: int) -> tuple[dict, bytes | None]:
    meta, tensors = state.to_record()
    try:
        meta = json.loads(json.dumps(meta))  # exactly what the JSON column will hold
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{type(state).__name__}.to_record() metadata is not JSON: {exc}") from exc
    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise ValueError(f"{type(state).__name__}.to_record() tensors {bad[:3]} are not tensors")
    if not tensors:
        return meta, None
    cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    # The blob names its (lineage, method, generation): every save writes bytes of its own, so
    # two lineages never share a blob and collect_garbage cannot delete one that another
    # worker's uncommitted save is about to reference.
    return meta, st_save(cpu, metadata={_BLOB_TAG: method, "lineage": lineage,
                                        "generation": str(generation)})


def save_state(
    session: Session,
    blobs: BlobStore,
    lineage: str,
    method: str,
    state: PolicyState | None,
    *,
    expected_generation: int,
    round_id: str | None,
) -> SavedState:
    """Write ``state`` (None: clear it) as generation ``expected_generation + 1``, in the
    caller's transaction. Raises StateConflictError if the stored generation is not the one
    the round read."""
    conflict = (f"the carried {method} state of lineage {lineage!r} changed while this round ran "
                f"(read generation {expected_generation}); not mixing two chains of state")
    row = _row(session, lineage, method, for_update=True)
    current = row.generation if row is not None else 0
    if current != expected_generation:
        raise StateConflictError(f"{conflict}: now generation {current}")
    if state is None:
        meta, data, schema = None, None, 0
    else:
        meta, data = _encode(state, method, lineage, expected_generation + 1)
        schema = type(state).SCHEMA
    sha = blobs.put(data) if data is not None else None  # the blob before the row naming it
    values = dict(schema=schema, generation=expected_generation + 1, round_id=round_id, meta=meta,
                  tensors_sha256=sha, updated_at=utcnow())
    if row is None:
        session.add(PolicyStateRecord(lineage=lineage, method=method, **values))
        try:
            session.flush()  # a concurrent first save violates (lineage, method) uniqueness
        except IntegrityError as exc:  # the caller's transaction rolls back with the round
            raise StateConflictError(f"{conflict}: another round saved first") from exc
        return SavedState(expected_generation + 1, sha, None)
    old = row.tensors_sha256
    # Conditional on the generation: the authority where the row lock above is a no-op (SQLite).
    res: CursorResult[Any] = session.execute(  # type: ignore[assignment]  # UPDATE: a cursor result
        update(PolicyStateRecord)
        .where(PolicyStateRecord.id == row.id, PolicyStateRecord.generation == expected_generation)
        .values(**values).execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise StateConflictError(f"{conflict}: another round saved first")
    return SavedState(expected_generation + 1, sha, old if old and old != sha else None)


def collect_garbage(session: Session, blobs: BlobStore, shas: Iterable[str | None]) -> int:
    """After the commit: delete state blobs no row names any more (each save writes a blob of
    its own; the reference check guards against a row restored by hand). Returns the number
    deleted."""
    n = 0
    for sha in {s for s in shas if s}:
        refs = session.scalar(select(func.count()).select_from(PolicyStateRecord)
                              .where(PolicyStateRecord.tensors_sha256 == sha))
        if not refs and blobs.delete(sha):
            n += 1
    return n
