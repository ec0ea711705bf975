"""Poisoned inputs (issue 8, fault 8), on SQLite and PostgreSQL with real Fashion-MNIST images:
out-of-range float samples are refused at ingest over real gRPC with a per-sample reason, under
the configured bound; a round whose training loss explodes (out-of-range data that bypassed
ingest, or a learning rate far too large) fails with the step and the loss in its reason,
publishes nothing, retargets no device and leaves the carried policy state as it was."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sqlalchemy import func, select

from server.db.engine import transaction
from server.db.models import Device, ModelVersion, PolicyStateRecord, Round, Sample
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.samples import SampleIn, ingest_samples
from server.worker import RoundWorker
from shared.samples import encode_sample, sample_id
from tests.server.grpc_fleet import Fleet, md, pb_sample, stream

N_CLEAN = 300
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
DIVERGED = re.compile(r"TrainingDivergedError: loss is (\S+) at step (\d+)/(\d+) of .*, above the divergence "
                      r"bound (\S+) \(max_loss_factor=1000 x chance-level loss 2\.303\)")


# --- ingest -------------------------------------------------------------------------------


def _rows(ctx) -> int:
    with transaction(ctx.factory) as s:
        return s.scalar(select(func.count()).select_from(Sample))


def test_out_of_range_and_non_finite_float_samples_are_refused_over_grpc(server_ctx):
    fleet = Fleet(server_ctx)
    try:
        cred = fleet.register().device_credential
        spike = np.zeros((1, 28, 28), np.float32)
        spike[0, 3, 4] = 1e30
        bad = {"1e30": pb_sample(np.full((1, 28, 28), 1e30, np.float32), 1), "spike": pb_sample(spike, 2),
               "nan": pb_sample(np.full((1, 28, 28), np.nan, np.float32), 3),
               "inf": pb_sample(np.full((1, 28, 28), -np.inf, np.float32), 4)}
        good = pb_sample(np.full((1, 28, 28), 0.5, np.float32), 5)
        resp = fleet.stub.UploadSamples(stream([*bad.values(), good]), metadata=md(cred), timeout=30)
    finally:
        fleet.close()
    assert resp.accepted == 1 and list(resp.committed_ids) == [good.sample_id]
    reasons = {r.sample_id: r.reason for r in resp.rejected}
    assert set(reasons) == {b.sample_id for b in bad.values()}
    assert reasons[bad["1e30"].sample_id] == ("float sample value of magnitude 1e+30 exceeds "
                                              "sample_value_abs_max=1000 (inputs reach the model unscaled)")
    assert "magnitude 1e+30" in reasons[bad["spike"].sample_id]
    assert "NaN or infinity" in reasons[bad["nan"].sample_id] and "NaN or infinity" in reasons[bad["inf"].sample_id]
    assert _rows(server_ctx) == 1 and not any(server_ctx.blobs.has(b.sample_id) for b in bad.values())


def test_the_servers_sample_value_bound_is_the_one_applied(server_ctx):
    fleet = Fleet(server_ctx, sample_value_abs_max=4.0)  # as EDGELOOP_SAMPLE_VALUE_ABS_MAX=4 would
    try:
        cred = fleet.register().device_credential
        inside, outside = (pb_sample(np.full((1, 28, 28), v, np.float32), 1) for v in (-4.0, 4.5))
        resp = fleet.stub.UploadSamples(stream([inside, outside]), metadata=md(cred), timeout=30)
    finally:
        fleet.close()
    assert list(resp.committed_ids) == [inside.sample_id]
    assert [(r.sample_id, "sample_value_abs_max=4 " in r.reason) for r in resp.rejected] == [(outside.sample_id, True)]


# --- rounds on poisoned data ----------------------------------------------------------------


@pytest.fixture
def fleet(server_ctx, fashion_mnist):
    """One device with a few hundred clean labelled images, and a worker."""
    ctx = server_ctx
    ctx.blobs.fsync = False
    with transaction(ctx.factory) as s:
        dev = D.register_device(s, hardware_id="hw-1").device
        samples = []
        for x, y in zip(fashion_mnist.x_train[:N_CLEAN], fashion_mnist.y_train[:N_CLEAN], strict=True):
            payload = encode_sample(x)
            samples.append(SampleIn(sample_id(payload), payload, int(y), {}))
        assert ingest_samples(s, ctx.blobs, dev, samples, arch=ctx.settings.arch,
                              max_bytes=ctx.settings.max_sample_bytes).accepted == N_CLEAN
        device_id = dev.id
    worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    return ctx, worker, device_id


def _poison(ctx, device_id: str, n: int, value: float) -> None:
    """Store labelled float samples of magnitude ``value`` as ingest would, but without its
    checks: data that predates the bound, or was written behind the server's back."""
    rng = np.random.default_rng(7)
    with transaction(ctx.factory) as s:
        for i in range(n):
            x = (rng.choice([-1.0, 1.0], size=(1, 28, 28)) * value).astype(np.float32)
            payload = encode_sample(x)
            sid = ctx.blobs.put(payload, expected_sha256=sample_id(payload))
            s.add(Sample(device_id=device_id, sample_id=sid, label=i % 10, shape=[1, 28, 28], dtype="float32",
                         size=len(payload), meta={}))


def _round(ctx, method: str, params: dict) -> str:
    with transaction(ctx.factory) as s:
        return R.create_round(s, method=method, cohort={"all": True}, params=params).id


def _world(ctx) -> dict:
    """Everything a round may change: versions, device targets, carried states and their blobs."""
    with transaction(ctx.factory) as s:
        states = [(r.lineage, r.method, r.schema, r.generation, r.round_id, r.meta, r.tensors_sha256, r.updated_at)
                  for r in s.scalars(select(PolicyStateRecord).order_by(PolicyStateRecord.id))]
        return {
            "versions": sorted(s.scalars(select(ModelVersion.model_hash))),
            "targets": dict(s.execute(select(Device.id, Device.target_model_hash)).all()),
            "states": states,
            "state_blobs": {sha: ctx.blobs.get(sha) for *_, sha, _ in states if sha},
        }


def _failed_as_diverged(ctx, worker, rid: str, before: dict) -> re.Match:
    generation = ctx.targets_changed.generation
    assert worker.run_next()
    with transaction(ctx.factory) as s:
        rnd = s.get(Round, rid)
        status, reason, model_hash, finished = rnd.status, rnd.reason, rnd.model_hash, rnd.finished_at
    assert status == R.FAILED, (status, reason)
    match = DIVERGED.search(reason)
    assert match, reason
    assert float(match[1]) > float(match[4]) == pytest.approx(2302.585, rel=1e-3)  # the loss, above the bound
    assert model_hash is None and finished is not None
    assert _world(ctx) == before  # nothing published or retargeted, carried state untouched
    assert ctx.targets_changed.generation == generation
    return match


@pytest.mark.parametrize("method, params", [
    ("full", {"epochs": 1, "batch_size": 32}),
    ("dpu", {"epochs": 1, "batch_size": 32, "k": 0.05, "skip_if_worse": False}),
])
def test_a_round_on_out_of_range_data_fails_and_changes_nothing(fleet, method, params):
    ctx, worker, device_id = fleet
    # A healthy round first, so there is a trained version to protect (and, for DPU, carried state).
    first = _round(ctx, method, params)
    assert worker.run_next()
    with transaction(ctx.factory) as s:
        assert s.get(Round, first).status == R.DONE, s.get(Round, first).reason
    before = _world(ctx)
    assert len(before["versions"]) == 2 and len(before["states"]) == (1 if method == "dpu" else 0)

    _poison(ctx, device_id, 60, 1e6)  # far above any ingest bound; the loss explodes at once
    _failed_as_diverged(ctx, worker, _round(ctx, method, params), before)  # loss above the bound


def test_a_round_whose_learning_rate_blows_the_loss_up_fails(fleet):
    ctx, worker, _ = fleet
    before = _world(ctx)
    # Adam at lr=10 on clean images: the loss leaves ln(10) for ~1e9 within a few steps, finite
    # all along (so only the bound catches it), and would "recover" to a useless model.
    match = _failed_as_diverged(ctx, worker, _round(ctx, "full", {"epochs": 2, "batch_size": 32, "lr": 10.0}),
                                before)
    assert int(match[2]) > 1  # the first step was healthy: the run exploded
    # Lifting the bound (max_loss_factor: null) lets the same run finish; it may then ship or not.
    rid = _round(ctx, "full", {"epochs": 2, "batch_size": 32, "lr": 10.0, "max_loss_factor": None})
    assert worker.run_next()
    with transaction(ctx.factory) as s:
        assert s.get(Round, rid).status in (R.DONE, R.SKIPPED), s.get(Round, rid).reason
