"""Carried policy state in its table, on SQLite and PostgreSQL: exact round trip, a record of
another schema or a broken one is set aside with a note, optimistic concurrency on the
generation, and superseded tensor blobs are collected once no row names them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from sqlalchemy import select

from server.db.engine import transaction
from server.db.models import PolicyStateRecord
from server.training.policy import PolicyState
from server.training.state_store import StateConflictError, collect_garbage, load_state, save_state


class ChainState(PolicyState):
    """A small stand-in for DPU's state: a counter, a seed and a tensor chain."""

    SCHEMA: ClassVar[int] = 3

    def __init__(self, rounds: int, seed: int, weights: dict[str, torch.Tensor]) -> None:
        self.rounds, self.seed, self.weights = rounds, seed, weights

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"rounds": self.rounds, "seed": self.seed}, {f"w/{k}": v for k, v in self.weights.items()}

    @classmethod
    def from_record(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ChainState:
        if not isinstance(meta.get("rounds"), int):
            raise ValueError("rounds missing")
        return cls(meta["rounds"], int(meta["seed"]), {k[2:]: v for k, v in tensors.items() if k.startswith("w/")})


class ChainStateV4(ChainState):
    SCHEMA: ClassVar[int] = 4


def _state(rounds: int, scale: float = 1.0) -> ChainState:
    return ChainState(rounds, 7, {"net.1.weight": torch.arange(12.0).reshape(3, 4) * scale,
                                  "net.1.bias": torch.full((3,), -scale, dtype=torch.float16)})


def _save(ctx, lineage: str, state, expected: int, method: str = "dpu"):
    with transaction(ctx.factory) as s:
        return save_state(s, ctx.blobs, lineage, method, state, expected_generation=expected, round_id="r" * 32)


def _load(ctx, lineage: str, cls=ChainState, method: str = "dpu"):
    with transaction(ctx.factory) as s:
        return load_state(s, ctx.blobs, lineage, method, cls)


def test_round_trip_is_exact_and_generations_grow(server_ctx):
    assert _load(server_ctx, "tag:a") == (None, 0, "")
    first = _save(server_ctx, "tag:a", _state(1), expected=0)
    assert first.generation == 1 and first.superseded is None and server_ctx.blobs.has(first.tensors_sha256)
    back, gen, note = _load(server_ctx, "tag:a")
    assert gen == 1 and note == "" and isinstance(back, ChainState)
    assert back.rounds == 1 and back.seed == 7
    assert torch.equal(back.weights["net.1.weight"], torch.arange(12.0).reshape(3, 4))
    assert back.weights["net.1.bias"].dtype == torch.float16
    assert torch.equal(back.weights["net.1.bias"], torch.full((3,), -1.0, dtype=torch.float16))

    # Each (lineage, method) is its own record.
    assert _load(server_ctx, "tag:b") == (None, 0, "")
    assert _load(server_ctx, "tag:a", method="full") == (None, 0, "")

    second = _save(server_ctx, "tag:a", _state(2, 2.0), expected=1)
    assert second.generation == 2 and second.superseded == first.tensors_sha256
    back, gen, _ = _load(server_ctx, "tag:a")
    assert gen == 2 and back.rounds == 2 and torch.equal(back.weights["net.1.weight"], torch.arange(12.0).reshape(3, 4) * 2)
    with transaction(server_ctx.factory) as s:
        row = s.scalars(select(PolicyStateRecord).where(PolicyStateRecord.lineage == "tag:a")).one()
        assert row.meta == {"rounds": 2, "seed": 7} and row.schema == 3 and row.round_id == "r" * 32

    # Clearing keeps the row, so the generation never goes back (no ABA on a later first save).
    cleared = _save(server_ctx, "tag:a", None, expected=2)
    assert cleared.generation == 3 and cleared.tensors_sha256 is None
    assert _load(server_ctx, "tag:a") == (None, 3, "")
    with pytest.raises(StateConflictError):
        _save(server_ctx, "tag:a", _state(9), expected=0)


def test_another_schema_or_a_broken_record_starts_without_it_and_says_why(server_ctx):
    _save(server_ctx, "all", _state(5), expected=0)
    state, gen, note = _load(server_ctx, "all", cls=ChainStateV4)
    assert state is None and gen == 1
    assert "schema 3" in note and "schema 4" in note and "starting without it" in note

    with transaction(server_ctx.factory) as s:  # a record from_record refuses
        s.scalars(select(PolicyStateRecord)).one().meta = {"seed": 1}
    state, gen, note = _load(server_ctx, "all")
    assert state is None and gen == 1 and "rounds missing" in note

    # A missing tensors blob is noted too; the next save still continues the generation.
    saved = _save(server_ctx, "all", _state(6), expected=1)
    server_ctx.blobs.delete(saved.tensors_sha256)
    state, gen, note = _load(server_ctx, "all")
    assert state is None and gen == 2 and "missing" in note
    assert _save(server_ctx, "all", _state(7), expected=gen).generation == 3


def test_a_stale_generation_is_a_conflict_and_changes_nothing(server_ctx):
    _save(server_ctx, "tag:a", _state(1), expected=0)
    # Two rounds both read generation 1; the first to save wins, the second is refused.
    _save(server_ctx, "tag:a", _state(2), expected=1)
    with pytest.raises(StateConflictError, match="generation 1.*now generation 2"):
        _save(server_ctx, "tag:a", _state(99), expected=1)
    back, gen, _ = _load(server_ctx, "tag:a")
    assert gen == 2 and back.rounds == 2
    # A first save racing another first save.
    _save(server_ctx, "tag:b", _state(1), expected=0)
    with pytest.raises(StateConflictError):
        _save(server_ctx, "tag:b", _state(1, 3.0), expected=0)


def test_conflicting_save_in_one_transaction_rolls_back_with_it(server_ctx):
    """The save shares the round's transaction: a conflict undoes the round's other writes."""
    _save(server_ctx, "tag:a", _state(1), expected=0)
    _save(server_ctx, "tag:a", _state(2), expected=1)
    with pytest.raises(StateConflictError):
        with transaction(server_ctx.factory) as s:
            save_state(s, server_ctx.blobs, "tag:b", "dpu", _state(1), expected_generation=0, round_id=None)
            save_state(s, server_ctx.blobs, "tag:a", "dpu", _state(3), expected_generation=1, round_id=None)
    assert _load(server_ctx, "tag:b") == (None, 0, "")


def test_superseded_blobs_are_collected_once_unreferenced(server_ctx):
    a1 = _save(server_ctx, "tag:a", _state(1), expected=0)
    # Same content, other lineage: a blob of its own, so collecting tag:a's garbage can never
    # delete a blob that another lineage's (possibly uncommitted) save names.
    b1 = _save(server_ctx, "tag:b", _state(1), expected=0)
    assert a1.tensors_sha256 != b1.tensors_sha256
    a2 = _save(server_ctx, "tag:a", _state(2, 2.0), expected=1)
    assert a2.superseded == a1.tensors_sha256
    with transaction(server_ctx.factory) as s:
        assert collect_garbage(s, server_ctx.blobs, [a2.superseded, None]) == 1
    assert not server_ctx.blobs.has(a1.tensors_sha256) and server_ctx.blobs.has(b1.tensors_sha256)
    b2 = _save(server_ctx, "tag:b", _state(2, 3.0), expected=1)
    with transaction(server_ctx.factory) as s:
        assert collect_garbage(s, server_ctx.blobs, [b2.superseded]) == 1
        # A blob some row still names is kept whatever the caller asks.
        assert collect_garbage(s, server_ctx.blobs, [a2.tensors_sha256]) == 0
    assert not server_ctx.blobs.has(b1.tensors_sha256)
    assert server_ctx.blobs.has(a2.tensors_sha256) and server_ctx.blobs.has(b2.tensors_sha256)
    assert _load(server_ctx, "tag:a")[0].rounds == 2 and _load(server_ctx, "tag:b")[0].rounds == 2


def test_non_json_metadata_is_refused_before_anything_is_written(server_ctx):
    class Bad(ChainState):
        def to_record(self):
            return {"when": object()}, {}

    with pytest.raises(ValueError, match="not JSON"):
        _save(server_ctx, "all", Bad(1, 1, {}), expected=0)
    assert _load(server_ctx, "all") == (None, 0, "")
