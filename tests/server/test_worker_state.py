"""The worker and carried state, on SQLite and PostgreSQL with real Fashion-MNIST samples: a
round trains on its cohort's data and saves its state in the publishing transaction; a state
that changed under it fails the round and publishes nothing; an unreadable state is noted and
the round starts without it; a round taken from its worker mid-training (reaped, or failed by
the worker's own stop) publishes nothing, while a running worker's heartbeat keeps it."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from server.db.engine import transaction
from server.db.models import ModelVersion, PolicyStateRecord, Round
from server.domain import rounds as R
from server.training.dpu import DPUPolicy, DPUState
from server.training.state_store import load_state, save_state
from server.worker import RoundWorker
from tests.server.test_rest_api import ingest, register

PARAMS = {"k": 0.05, "epochs": 1, "batch_size": 32, "skip_if_worse": False}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def fleet(server_ctx, fashion_mnist):
    """Two tag cohorts with different amounts of labelled data."""
    ctx = server_ctx
    ctx.blobs.fsync = False
    x, y = fashion_mnist.x_train, [int(v) for v in fashion_mnist.y_train]
    a = register(ctx, "hw-a", tags=["site-a"]).device.id
    b = register(ctx, "hw-b", tags=["site-b"]).device.id
    ingest(ctx, a, x[:90], y[:90])
    ingest(ctx, b, x[90:150], y[90:150])
    worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    return ctx, worker


def _round(ctx, cohort: dict, **kw) -> str:
    with transaction(ctx.factory) as s:
        return R.create_round(s, method="dpu", cohort=cohort, params={**PARAMS, **kw.pop("params", {})}, **kw).id


def _get(ctx, rid: str) -> Round:
    with transaction(ctx.factory) as s:
        return s.get(Round, rid)


def test_rounds_train_on_their_cohort_and_keep_state_per_lineage(fleet):
    ctx, worker = fleet
    ra = _round(ctx, {"tag": "site-a"})
    rb = _round(ctx, {"tag": "site-b"})
    rall = _round(ctx, {"tag": "site-b"}, data_scope="all")
    assert worker.run_next() and worker.run_next() and worker.run_next()
    a, b, b_all = _get(ctx, ra), _get(ctx, rb), _get(ctx, rall)
    assert (a.status, b.status, b_all.status) == (R.DONE, R.DONE, R.DONE), (a.reason, b.reason, b_all.reason)
    assert a.metrics["labelled_samples"] == 90 and b.metrics["labelled_samples"] == 60
    assert b_all.metrics["labelled_samples"] == 150  # data_scope "all": every device's samples
    assert a.metrics["state_generation"] == 1 and b.metrics["state_generation"] == 1
    assert b_all.metrics["state_generation"] == 2 and b_all.base_model_hash == b.model_hash
    with transaction(ctx.factory) as s:
        assert s.get(ModelVersion, a.model_hash).lineage == "tag:site-a"
        sa, ga, _ = load_state(s, ctx.blobs, "tag:site-a", "dpu", DPUState)
        sb, gb, _ = load_state(s, ctx.blobs, "tag:site-b", "dpu", DPUState)
    assert (ga, gb) == (1, 2)
    assert sa.n_at_last_init == a.metrics["train_samples"] and sa.shadow is None
    # b's second round saw more than twice b's first data: §5.4.2 starts a shadow chain there.
    assert b_all.metrics["train_samples"] > 2 * b.metrics["n_at_last_init"] == 2 * b.metrics["train_samples"]
    assert sb.n_at_last_init == b_all.metrics["train_samples"] and sb.shadow is not None
    assert a.worker_id == worker.worker_id and a.heartbeat_at is not None


def test_a_state_saved_by_someone_else_mid_round_fails_the_round(fleet, monkeypatch):
    ctx, worker = fleet
    assert worker.run_next() is False
    first = _round(ctx, {"tag": "site-a"})
    worker.run_next()
    with transaction(ctx.factory) as s:
        versions = s.scalar(select(func.count()).select_from(ModelVersion))
    real_run = DPUPolicy.run

    def run_and_race(self, inputs):
        out = real_run(self, inputs)
        with transaction(ctx.factory) as s:  # as if another worker saved this lineage meanwhile
            save_state(s, ctx.blobs, "tag:site-a", "dpu", DPUState(12345), expected_generation=1, round_id=None)
        return out

    monkeypatch.setattr(DPUPolicy, "run", run_and_race)
    second = _round(ctx, {"tag": "site-a"})
    assert worker.run_next()
    rnd = _get(ctx, second)
    assert rnd.status == R.FAILED and "StateConflictError" in rnd.reason and "changed while this round ran" in rnd.reason
    with transaction(ctx.factory) as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == versions  # nothing published
        state, gen, _ = load_state(s, ctx.blobs, "tag:site-a", "dpu", DPUState)
    assert gen == 2 and state.n_at_last_init == 12345  # the other writer's state, not a mix
    assert _get(ctx, first).status == R.DONE


def test_an_unreadable_state_is_noted_and_the_round_starts_without_it(fleet):
    ctx, worker = fleet
    rid = _round(ctx, {"tag": "site-b"})
    worker.run_next()
    with transaction(ctx.factory) as s:
        s.scalars(select(PolicyStateRecord).where(PolicyStateRecord.lineage == "tag:site-b")).one().schema = 99
    again = _round(ctx, {"tag": "site-b"})
    worker.run_next()
    rnd = _get(ctx, again)
    assert rnd.status == R.DONE, rnd.reason
    assert "schema 99" in rnd.metrics["state_note"] and "starting without it" in rnd.metrics["state_note"]
    assert rnd.metrics["state_generation"] == 2 and _get(ctx, rid).metrics["state_generation"] == 1
    with transaction(ctx.factory) as s:
        _, gen, note = load_state(s, ctx.blobs, "tag:site-b", "dpu", DPUState)
    assert gen == 2 and note == ""  # rewritten under the current schema


def _versions(ctx) -> int:
    with transaction(ctx.factory) as s:
        return s.scalar(select(func.count()).select_from(ModelVersion))


def _no_state(ctx, lineage: str) -> bool:
    with transaction(ctx.factory) as s:
        return s.scalars(select(PolicyStateRecord).where(PolicyStateRecord.lineage == lineage)).first() is None


def test_a_round_reaped_while_it_trains_publishes_nothing(fleet, monkeypatch):
    ctx, worker = fleet
    versions = _versions(ctx)
    real_run = DPUPolicy.run

    def run_and_get_reaped(self, inputs):
        out = real_run(self, inputs)
        with transaction(ctx.factory) as s:  # another worker judged this one gone meanwhile
            rnd = R.get_round(s, rid, for_update=True)
            R.transition(s, rnd, R.FAILED, reason="interrupted: reaped by another worker")
        return out

    monkeypatch.setattr(DPUPolicy, "run", run_and_get_reaped)
    rid = _round(ctx, {"tag": "site-a"})
    assert worker.run_next()
    rnd = _get(ctx, rid)
    assert rnd.status == R.FAILED and rnd.reason == "interrupted: reaped by another worker"  # not overwritten
    assert rnd.model_hash is None and _versions(ctx) == versions
    assert _no_state(ctx, "tag:site-a")  # the state of a round that shipped nothing is not kept
    with transaction(ctx.factory) as s:
        assert not R.heartbeat(s, rid, worker.worker_id)  # and its owner's heartbeat is refused


def test_stopping_a_worker_mid_round_fails_the_round_and_its_late_result_is_refused(fleet, monkeypatch,
                                                                                    wait_until):
    ctx, _ = fleet
    settings = ctx.settings.model_copy(update={"worker_heartbeat_s": 0.05})
    worker = RoundWorker(settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    training, release = threading.Event(), threading.Event()
    real_run = DPUPolicy.run

    def held_run(self, inputs):
        training.set()
        assert release.wait(60)
        return real_run(self, inputs)

    monkeypatch.setattr(DPUPolicy, "run", held_run)
    versions = _versions(ctx)
    rid = _round(ctx, {"tag": "site-b"})
    worker.start()
    try:
        assert training.wait(60)
        claimed = _get(ctx, rid)
        assert claimed.status == R.TRAINING and claimed.worker_id == worker.worker_id
        # While it trains, the heartbeat thread keeps the claim fresh.
        wait_until(lambda: _get(ctx, rid).heartbeat_at > claimed.heartbeat_at, 30, "a heartbeat")
        with transaction(ctx.factory) as s:  # a live worker's round is not reaped
            assert R.fail_interrupted(s, stale_after_s=settings.worker_stale_s) == 0
        worker.stop(timeout=0.2)  # the round outlasts the grace period
        stopped = _get(ctx, rid)
        assert stopped.status == R.FAILED and "stopped mid-round" in stopped.reason
    finally:
        release.set()
        worker._thread.join(60)
    assert not worker._thread.is_alive()
    after = _get(ctx, rid)
    assert (after.status, after.reason, after.model_hash) == (R.FAILED, stopped.reason, None)
    assert _versions(ctx) == versions and _no_state(ctx, "tag:site-b")
