"""The round state machine, atomic claiming by concurrent workers, and crash recovery, on
SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from server.context import ServerContext
from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Round
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.errors import ConflictError, InvalidArgumentError, NotFoundError
from server.domain.lineage import lineage_key

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
        dev = D.register_device(s, hardware_id="hw").device.id
    assert R.validate_cohort({"device_ids": [dev, dev]}) == {"device_ids": [dev]}
    assert R.validate_cohort({"tag": "site-a"}) == {"tag": "site-a"}
    for bad in ({}, {"all": False}, {"all": "yes"}, {"device_ids": []}, {"device_ids": [1]}, {"tag": ""}, {"tag": "Bad Tag"}, {"tag": "t" * 65},
                {"all": True, "tag": "x"}, {"device_ids": ["x"] * 10_001}):
        with pytest.raises(InvalidArgumentError, match="cohort"):
            R.validate_cohort(bad)
    new_round(server_ctx, {"device_ids": [dev]})
    with pytest.raises(NotFoundError):  # unknown devices fail at creation, not in the worker
        new_round(server_ctx, {"device_ids": [dev, "f" * 32]})


def finish(ctx, round_id: str) -> None:
    with transaction(ctx.factory) as s:
        rnd = s.get(Round, round_id)
        R.transition(s, rnd, R.PUBLISHING)
        R.transition(s, rnd, R.DONE)


def test_lineage_keys():
    assert lineage_key({"all": True}) == "all"
    assert lineage_key({"tag": "site-a"}) == "tag:site-a"
    ids = ["b" * 32, "a" * 32]
    key = lineage_key({"device_ids": ids})
    assert key == "devices:" + hashlib.sha256(f"{'a' * 32},{'b' * 32}".encode()).hexdigest()[:16]
    assert key == lineage_key({"device_ids": list(reversed(ids))}) == lineage_key({"device_ids": ids + ids[:1]})
    assert key != lineage_key({"device_ids": ids[:1]})
    for bad in ({}, {"all": False}, {"tag": ""}, {"device_ids": []}, {"all": True, "tag": "x"}):
        with pytest.raises(InvalidArgumentError):
            lineage_key(bad)


def test_rounds_record_lineage_and_data_scope(server_ctx):
    with transaction(server_ctx.factory) as s:
        a = R.create_round(s, method="full", cohort={"tag": "site-a"}, params={})
        b = R.create_round(s, method="full", cohort={"all": True}, params={}, data_scope="all")
        assert (a.lineage, a.data_scope) == ("tag:site-a", "cohort")
        assert (b.lineage, b.data_scope) == ("all", "all")
        report = R.round_report(s, a)
        assert report["lineage"] == "tag:site-a" and report["data_scope"] == "cohort"
        with pytest.raises(InvalidArgumentError, match="data_scope"):
            R.create_round(s, method="full", cohort={"all": True}, params={}, data_scope="everything")


def test_claim_next_takes_the_oldest_queued_round_of_an_idle_lineage(server_ctx):
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) is None
    ids = [new_round(server_ctx) for _ in range(3)]
    other = new_round(server_ctx, {"tag": "site-b"})
    force_status(server_ctx, ids[0], R.FAILED)
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s, worker_id="w1") == ids[1]
    with transaction(server_ctx.factory) as s:
        rnd = s.get(Round, ids[1])
        assert rnd.status == R.TRAINING and rnd.started_at is not None
        assert rnd.worker_id == "w1" and rnd.heartbeat_at is not None
        # Lineage "all" is busy: its next round waits; another lineage's round runs meanwhile.
        assert R.claim_next(s) == other
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) is None
    finish(server_ctx, ids[1])
    with transaction(server_ctx.factory) as s:
        assert R.claim_next(s) == ids[2]
        assert R.claim_next(s) is None


def test_the_database_refuses_two_running_rounds_of_one_lineage(server_ctx):
    a, b = new_round(server_ctx, {"tag": "x"}), new_round(server_ctx, {"tag": "x"})
    force_status(server_ctx, a, R.TRAINING)
    with pytest.raises(IntegrityError):
        force_status(server_ctx, b, R.PUBLISHING)
    force_status(server_ctx, a, R.DONE)
    force_status(server_ctx, b, R.TRAINING)  # once the first is done


def test_concurrent_workers_claim_each_round_once_and_a_lineage_one_at_a_time(server_settings):
    """Several workers (threads with their own connections, as separate server processes would
    have) race for rounds of three lineages: every round is claimed exactly once, rounds of a
    lineage in creation order, never two of one lineage at the same time."""
    ctxs = [ServerContext.open(server_settings) for _ in range(4)]
    try:
        ids = [new_round(ctxs[0], {"tag": f"t{i % 3}"}) for i in range(9)]
        lineage_of = {rid: f"tag:t{i % 3}" for i, rid in enumerate(ids)}
        claimed: list[str] = []
        running: set[str] = set()
        lock = threading.Lock()
        barrier = threading.Barrier(len(ctxs))
        errors: list[BaseException] = []

        def worker(ctx) -> None:
            try:
                barrier.wait()
                while True:
                    try:
                        with transaction(ctx.factory) as s:
                            got = R.claim_next(s, worker_id=f"w{id(ctx)}")
                    except IntegrityError:  # lost a race for a lineage: look again
                        continue
                    if got is not None:
                        with lock:
                            assert lineage_of[got] not in running, "two rounds of one lineage at once"
                            running.add(lineage_of[got])
                            claimed.append(got)
                        with transaction(ctx.factory) as s:  # "work" while holding the lineage
                            assert s.get(Round, got).worker_id == f"w{id(ctx)}"
                        with lock:
                            running.discard(lineage_of[got])
                        finish(ctx, got)
                        continue
                    with transaction(ctx.factory) as s:  # None: lost a race, a busy lineage, or the end?
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
        for lineage in set(lineage_of.values()):  # each lineage's rounds in creation order
            assert [r for r in claimed if lineage_of[r] == lineage] == [r for r in ids if lineage_of[r] == lineage]
    finally:
        for c in ctxs:
            c.close()


def test_fail_interrupted_fails_only_running_rounds(server_ctx):
    ids = {status: new_round(server_ctx, {"tag": status}) for status in STATES}
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


def _claimed_by(ctx, worker_id: str, *, beat_age_s: float = 0.0) -> str:
    rid = new_round(ctx, {"tag": f"w{uuid.uuid4().hex[:8]}"})
    with transaction(ctx.factory) as s:
        s.get(Round, rid).status = R.TRAINING
        s.get(Round, rid).worker_id = worker_id
        s.get(Round, rid).heartbeat_at = utcnow() - timedelta(seconds=beat_age_s)
    return rid


def test_fail_interrupted_leaves_live_workers_rounds_alone(server_ctx):
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process of this host that has exited
    mine = R.new_worker_id()
    R.set_worker_live(mine, True)
    try:
        rounds = {
            "live here": _claimed_by(server_ctx, mine),
            "earlier run of this pid": _claimed_by(server_ctx, f"{host}:{os.getpid()}:deadbeef"),
            "exited process": _claimed_by(server_ctx, f"{host}:{child.pid}:00000000"),
            "live parent process": _claimed_by(server_ctx, f"{host}:{os.getppid()}:00000000"),
            "other host, beating": _claimed_by(server_ctx, "elsewhere:1:00000000", beat_age_s=1),
            "other host, silent": _claimed_by(server_ctx, "elsewhere:2:00000000", beat_age_s=120),
        }
        with transaction(server_ctx.factory) as s:
            assert R.fail_interrupted(s, stale_after_s=60) == 3
        with transaction(server_ctx.factory) as s:
            status = {k: s.get(Round, rid).status for k, rid in rounds.items()}
            assert "sent no heartbeat for 60 s" in s.get(Round, rounds["other host, silent"]).reason
        assert status == {"live here": R.TRAINING, "earlier run of this pid": R.FAILED, "exited process": R.FAILED,
                          "live parent process": R.TRAINING, "other host, beating": R.TRAINING,
                          "other host, silent": R.FAILED}
        with transaction(server_ctx.factory) as s:  # a heartbeat only counts for the round's owner
            assert R.heartbeat(s, rounds["live here"], mine)
            assert R.heartbeat(s, rounds["live here"], mine, status=R.TRAINING)
            assert not R.heartbeat(s, rounds["live here"], mine, status=R.PUBLISHING)  # not in that state
            assert not R.heartbeat(s, rounds["live here"], "someone-else")
            assert not R.heartbeat(s, rounds["exited process"], f"{host}:{child.pid}:00000000")
    finally:
        R.set_worker_live(mine, False)


def test_server_start_fails_rounds_a_crash_left_running(server_settings):
    ctx = ServerContext.open(server_settings)
    rid = new_round(ctx)
    with transaction(ctx.factory) as s:
        assert R.claim_next(s, worker_id=f"{socket.gethostname()}:{os.getpid()}:crashed0") == rid
    ctx.close()  # "crash" mid-training: that worker is not live in this process
    ctx = ServerContext.open(server_settings)
    try:
        with transaction(ctx.factory) as s:
            rnd = s.get(Round, rid)
            assert rnd.status == R.FAILED and "interrupted" in rnd.reason
    finally:
        ctx.close()
