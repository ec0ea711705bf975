"""The update lifecycle tables and their persisted record: every legal transition, every
illegal one raising, the resume table as specified, and the state file's atomic, versioned
round trip."""

from __future__ import annotations

import json

import pytest

from edge_agent.update_state import (
    MAX_REASON,
    MAX_ROLLBACKS,
    ON_ERROR,
    RESTING,
    RESUME,
    SCHEMA,
    TRANSITIONS,
    WORKING,
    Event,
    IllegalTransition,
    Probation,
    RollbackReport,
    State,
    UpdateRecord,
    UpdateStateFile,
    next_state,
    short,
)

S, E = State, Event

# The specification, written out independently of the module's table.
LEGAL = [
    (S.IDLE, E.START, S.DOWNLOADING),
    (S.COMMITTED, E.START, S.DOWNLOADING),
    (S.ROLLED_BACK, E.START, S.DOWNLOADING),
    (S.FAILED, E.START, S.DOWNLOADING),
    (S.DOWNLOADING, E.DOWNLOADED, S.VERIFYING),
    (S.DOWNLOADING, E.INTERRUPTED, S.DOWNLOADING),
    (S.DOWNLOADING, E.ABORT, S.IDLE),
    (S.DOWNLOADING, E.FAILED, S.FAILED),
    (S.DOWNLOADING, E.LOOP, S.FAILED),
    (S.VERIFYING, E.MORE, S.DOWNLOADING),
    (S.VERIFYING, E.VERIFIED, S.INSTALLING),
    (S.VERIFYING, E.FAILED, S.FAILED),
    (S.INSTALLING, E.INSTALLED, S.PROBATION),
    (S.INSTALLING, E.FAILED, S.FAILED),
    (S.INSTALLING, E.REJECTED, S.ROLLING_BACK),
    (S.PROBATION, E.PASSED, S.COMMITTED),
    (S.PROBATION, E.REJECTED, S.ROLLING_BACK),
    (S.PROBATION, E.LOOP, S.ROLLING_BACK),
    (S.ROLLING_BACK, E.ROLLED_BACK, S.ROLLED_BACK),
    (S.ROLLING_BACK, E.INTERRUPTED, S.ROLLING_BACK),
    (S.ROLLING_BACK, E.FAILED, S.FAILED),
    (S.ROLLING_BACK, E.LOOP, S.FAILED),
]


@pytest.mark.parametrize("state, event, target", LEGAL, ids=lambda v: getattr(v, "value", v))
def test_every_legal_transition(state, event, target):
    assert next_state(state, event) is target


def test_the_table_holds_exactly_the_specified_transitions():
    assert TRANSITIONS == {(s, e): t for s, e, t in LEGAL}


ILLEGAL = [(s, e) for s in State for e in Event if (s, e) not in {(a, b) for a, b, _ in LEGAL}]


@pytest.mark.parametrize("state, event", ILLEGAL, ids=lambda v: v.value)
def test_every_other_transition_raises(state, event):
    with pytest.raises(IllegalTransition, match=f"from '{state.value}' on '{event.value}'"):
        next_state(state, event)


def test_resting_states_only_start_and_working_states_cannot_start():
    for s in RESTING:
        assert {e for (st, e) in TRANSITIONS if st is s} <= {E.START}
    for s in WORKING:
        assert (s, E.START) not in TRANSITIONS


def test_every_error_event_is_a_legal_exit_of_its_state():
    assert set(ON_ERROR) == set(WORKING)
    # Before the pointer switch nothing is rolled back; after it, the new model must go; a
    # rollback is retried rather than abandoned.
    assert ON_ERROR[S.DOWNLOADING] is ON_ERROR[S.VERIFYING] is E.FAILED
    assert ON_ERROR[S.INSTALLING] is ON_ERROR[S.PROBATION] is E.REJECTED
    assert next_state(S.ROLLING_BACK, ON_ERROR[S.ROLLING_BACK]) is S.ROLLING_BACK
    for s, e in ON_ERROR.items():
        next_state(s, e)  # legal


def test_loop_is_accepted_exactly_where_a_restart_can_resume_work():
    """LOOP fires only on start-up, in the working state RESUME re-entered: nowhere else."""
    resumed_working = {s for s in RESUME.values() if s in WORKING}
    assert {s for (s, e) in TRANSITIONS if e is E.LOOP} == resumed_working


EXPECTED_RESUME = {
    S.IDLE: (S.IDLE, S.IDLE),
    S.DOWNLOADING: (S.DOWNLOADING, S.DOWNLOADING),
    S.VERIFYING: (S.DOWNLOADING, S.DOWNLOADING),
    S.INSTALLING: (S.FAILED, S.PROBATION),
    S.PROBATION: (S.ROLLING_BACK, S.PROBATION),
    S.ROLLING_BACK: (S.ROLLING_BACK, S.ROLLING_BACK),
    S.COMMITTED: (S.COMMITTED, S.COMMITTED),
    S.ROLLED_BACK: (S.ROLLED_BACK, S.ROLLED_BACK),
    S.FAILED: (S.FAILED, S.FAILED),
}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_resume_table(state):
    """(persisted state, store's current model is the target) -> the state re-entered."""
    off_target, on_target = EXPECTED_RESUME[state]
    assert RESUME[(state, False)] is off_target
    assert RESUME[(state, True)] is on_target
    assert len(RESUME) == 2 * len(State)


HASH_A, HASH_B = "a" * 64, "b" * 64


def test_record_round_trips_through_the_file(tmp_path):
    f = UpdateStateFile(tmp_path / "update_state.json")
    assert f.load() == UpdateRecord()  # no file: idle
    rec = UpdateRecord(S.PROBATION, HASH_B, HASH_A, "installed", 123, 2, Probation(40, 0.5, 0.9),
                       (RollbackReport(HASH_A, "worse", 7),))
    f.save(rec)
    raw = json.loads(f.path.read_text())
    assert raw["schema"] == SCHEMA and raw["state"] == "probation"
    assert raw["target_hash"] == HASH_B and raw["previous_hash"] == HASH_A and raw["reason"] == "installed"
    assert f.load() == rec
    assert [p.name for p in tmp_path.iterdir()] == ["update_state.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"schema": 99, "state": "idle"}).encode(),
                                     json.dumps({"schema": SCHEMA, "state": "exploded"}).encode(),
                                     b"\xff\xfe"])
def test_an_unreadable_file_is_moved_aside_and_the_record_starts_idle(tmp_path, content):
    path = tmp_path / "update_state.json"
    path.write_bytes(content)
    assert UpdateStateFile(path).load() == UpdateRecord()
    assert not path.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("update_state.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_rollback_reports_are_bounded_and_deduplicated():
    rec = UpdateRecord()
    for i in range(MAX_ROLLBACKS + 5):
        rec = rec.with_rollback(RollbackReport(f"{i:064x}", f"r{i}", i))
    assert len(rec.rollbacks) == MAX_ROLLBACKS
    assert rec.rollbacks[-1].model_hash == f"{MAX_ROLLBACKS + 4:064x}"
    assert rec.rejected(f"{0:064x}") is None  # the oldest fell off
    again = rec.with_rollback(RollbackReport(f"{10:064x}", "again", 999))
    assert len(again.rollbacks) == MAX_ROLLBACKS and again.rollbacks[-1].reason == "again"
    assert sum(r.model_hash == f"{10:064x}" for r in again.rollbacks) == 1


def test_reasons_are_cut_to_what_the_server_accepts():
    assert short("ok") == "ok"
    cut = short("x" * 5000)
    assert len(cut) == MAX_REASON and cut.endswith("...")
