"""The round state machine, atomic claiming by concurrent workers, and crash recovery, on
SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from server.context import ServerContext
from server.db.engine import transaction
from server.db.models import Round
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.errors import ConflictError, InvalidArgumentError, NotFoundError

STATES = [R.QUEUED, R.TRAINING, R.PUBLISHING, R.DONE, R.SKIPPED, R.FAILED]


def new_round(ctx, cohort=None, **kw) -> str:
    with transaction(ctx.factory) as s:
        return R.create_round(s, method=kw.pop("method", "full"), cohort=cohort or {"all": True},
                              params=kw.pop("params", {})).id


def force_status(ctx, round_id: str, status: str) -> None:
    with transaction(ctx.factory) as s:
        s.get(Round, round_id).status = status


def test_every_transition_follows_the_table(server_ctx):
    rid = new_round(server_ctx)
    for src in STATES:
        for dst in STATES:
            force_status(server_ctx, rid, src)
            with transaction(server_ctx.factory) as s:
                rnd = s.get(Round, rid)
                if dst in R.TRANSITIONS[src]:
                    R.transition(s, rnd, dst, reason="because")
                    assert rnd.status == dst
                else:
                    with pytest.raises(ConflictError, match=f"from {src} to {dst}"):
                        R.transition(s, rnd, dst)
    # Terminal states lead nowhere; everything else can fail.
    assert all(not R.TRANSITIONS[t] for t in R.TERMINAL)
    assert all(R.FAILED in R.TRANSITIONS[t] for t in STATES if t not in R.TERMINAL)


def test_a_round_lifecycle_sets_times_progress_and_reason(server_ctx):
    rid = new_round(server_ctx, params={"epochs": 2})
    with transaction(server_ctx.factory) as s:
        rnd = R.get_round(s, rid)
        assert rnd.status == R.QUEUED and rnd.started_at is None and rnd.params == {"epochs": 2}
        R.transition(s, rnd, R.TRAINING)
        assert rnd.started_at is not None
        R.transition(s, rnd, R.PUBLISHING)
        R.transition(s, rnd, R.DONE)
        assert rnd.finished_at is not None and rnd.progress == 1.0
    rid2 = new_round(server_ctx)
    with transaction(server_ctx.factory) as s:
        rnd = R.get_round(s, rid2)
        R.transition(s, rnd, R.FAILED, reason="no data")
        assert rnd.reason == "no data" and rnd.progress == 0.0 and rnd.finished_at is not None
        report = R.round_report(s, rnd)
        assert report["status"] == R.FAILED and report["reason"] == "no data" and report["devices"] == []
        assert {r.id for r in R.list_rounds(s)} == {rid, rid2}
        with pytest.raises(NotFoundError):
            R.get_round(s, "nope")


def test_cohort_validation(server_ctx):
    with transaction(server_ctx.factory) as s:
        dev = D.register_device(s, expected_token=server_ctx.settings.enrollment_token,
                                enrollment_token=server_ctx.settings.enrollment_token, hardware_id="hw").device.id
    assert R.validate_cohort({"device_ids": [dev, dev]}) == {"device_ids": [dev]}
    assert R.validate_cohort({"tag": "site-a"}) == {"tag": "site-a"}
    for bad in ({}, {"all": False}, {"all": "yes"}, {"device_ids": []}, {"device_ids": [1]}, {"tag": ""},
                {"all": True, "tag": "x"}, {"device_ids": ["x"] * 10_001}):
        with pytest.raises(InvalidArgumentError, match="cohort"):
            R.validate_cohort(bad)
    new_round(server_ctx, {"device_ids": [dev]})
    with pytest.raises(NotFoundError):  # unknown devices fail at creation, not in the worker
        new_round(server_ctx, {"device_ids": [dev, "f" * 32]})


def test_claim_next_takes_the_oldest_queued_round(server_ctx):
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) is None
    ids = [new_round(server_ctx) for _ in range(3)]
    force_status(server_ctx, ids[0], R.FAILED)
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) == ids[1]
    with transaction(server_ctx.factory) as s:
        rnd = s.get(Round, ids[1])
        assert rnd.status == R.TRAINING and rnd.started_at is not None
        assert R.claim_next(s) == ids[2]
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) is None


def test_concurrent_workers_never_claim_a_round_twice(server_settings):
    """Several workers (threads with their own connections, as separate server processes would
    have) race for the same rounds; each round is claimed exactly once."""
    ctxs = [ServerContext.open(server_settings) for _ in range(4)]
    try:
        ids = [new_round(ctxs[0]) for _ in range(6)]
        claimed: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(ctxs))
        errors: list[BaseException] = []

        def worker(ctx) -> None:
            try:
                barrier.wait()
                while True:
                    with transaction(ctx.factory) as s:
                        got = R.claim_next(s)
                    if got is not None:
                        with lock:
                            claimed.append(got)
                        continue
                    with transaction(ctx.factory) as s:  # None: lost a race, or nothing left?
                        if s.scalar(select(func.count()).select_from(Round).where(Round.status == R.QUEUED)) == 0:
                            return
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(c,)) for c in ctxs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(claimed) == sorted(ids)  # every round once, none twice
    finally:
        for c in ctxs:
            c.close()


def test_fail_interrupted_fails_only_running_rounds(server_ctx):
    ids = {status: new_round(server_ctx) for status in STATES}
    for status, rid in ids.items():
        force_status(server_ctx, rid, status)
    with transaction(server_ctx.factory) as s:
        assert R.fail_interrupted(s) == 2
    with transaction(server_ctx.factory) as s:
        after = {status: s.get(Round, rid) for status, rid in ids.items()}
    for status in (R.TRAINING, R.PUBLISHING):
        assert after[status].status == R.FAILED and "interrupted" in after[status].reason
    for status in (R.QUEUED, R.DONE, R.SKIPPED, R.FAILED):
        assert after[status].status == status


def test_server_start_fails_rounds_a_crash_left_running(server_settings):
    ctx = ServerContext.open(server_settings)
    rid = new_round(ctx)
    with transaction(ctx.factory) as s:
        assert R.claim_next(s) == rid
    ctx.close()  # "crash" mid-training
    ctx = ServerContext.open(server_settings)
    try:
        with transaction(ctx.factory) as s:
            rnd = s.get(Round, rid)
            assert rnd.status == R.FAILED and "interrupted" in rnd.reason
    finally:
        ctx.close()
