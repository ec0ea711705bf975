"""The round worker end to end on a real database and real Fashion-MNIST samples: train,
publish, retarget devices; skip when nothing better comes out; fail bad rounds with a reason."""

from __future__ import annotations

import pytest

from server.db.engine import transaction
from server.db.models import Device, ModelVersion, Round
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.samples import SampleIn, ingest_samples
from server.domain.versions import latest_version, list_versions, load_state
from server.worker import RoundWorker
from shared.models import build_model
from shared.samples import encode_sample, sample_id
from shared.training import accuracy

N_LABELLED = 400
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def fleet(server_ctx, fashion_mnist):
    """A registered device that has uploaded a few hundred labelled Fashion-MNIST images."""
    ctx = server_ctx
    ctx.blobs.fsync = False  # 400 fsyncs buy nothing in a throwaway test directory
    with transaction(ctx.factory) as s:
        dev = D.register_device(s, hardware_id="hw-1").device
        samples = []
        for x, y in zip(fashion_mnist.x_train[:N_LABELLED], fashion_mnist.y_train[:N_LABELLED], strict=True):
            payload = encode_sample(x)
            samples.append(SampleIn(sample_id(payload), payload, int(y), {}))
        res = ingest_samples(s, ctx.blobs, dev, samples, arch=ctx.settings.arch, max_bytes=ctx.settings.max_sample_bytes)
        assert res.accepted == N_LABELLED
        device_id = dev.id
    return ctx, _worker(ctx), device_id


def queue(ctx, params: dict, method: str = "full", cohort: dict | None = None) -> str:
    with transaction(ctx.factory) as s:
        return R.create_round(s, method=method, cohort=cohort or {"all": True}, params=params).id


def get(ctx, round_id: str) -> Round:
    with transaction(ctx.factory) as s:
        return s.get(Round, round_id)


def test_full_retrain_round_publishes_a_better_model(fleet, fashion_mnist):
    ctx, worker, device_id = fleet
    with transaction(ctx.factory) as s:
        v0 = latest_version(s).model_hash
    generation = ctx.targets_changed.generation
    rid = queue(ctx, {"epochs": 6, "batch_size": 32, "lr": 1e-3})
    assert worker.run_next() is True
    rnd = get(ctx, rid)
    assert rnd.status == R.DONE, rnd.reason
    assert rnd.base_model_hash == v0 and rnd.model_hash and rnd.model_hash != v0
    assert rnd.progress == 1.0 and rnd.started_at and rnd.finished_at
    m = rnd.metrics
    assert m["labelled_samples"] == N_LABELLED and m["train_samples"] + m["val_samples"] == N_LABELLED
    assert m["val_accuracy"] > m["base_val_accuracy"] + 0.3, m
    assert m["full_model_bytes"] > 0 and m["train_seconds"] >= 0
    assert rnd.device_ids == [device_id]
    assert ctx.targets_changed.generation > generation  # watchers are woken

    with transaction(ctx.factory) as s:
        versions = list_versions(s)
        assert [v.number for v in versions] == [0, 1]
        v1 = versions[1]
        assert v1.model_hash == rnd.model_hash and v1.parent_hash == v0 and v1.round_id == rid
        assert v1.method == "full" and v1.fleet_default
        assert s.get(Device, device_id).target_model_hash == v1.model_hash
        arch, new_state = load_state(s, ctx.blobs, v1.model_hash)
        _, old_state = load_state(s, ctx.blobs, v0)
        report = R.round_report(s, rnd)
    assert report["devices_total"] == 1 and report["devices_on_version"] == 0  # not installed yet

    # Judged on images the server never saw: the published model beats the untrained one.
    new, old = build_model(arch), build_model(arch)
    new.load_state_dict(new_state)
    old.load_state_dict(old_state)
    x, y = fashion_mnist.x_test[:2000], fashion_mnist.y_test[:2000]
    acc_new, acc_old = accuracy(new, x, y), accuracy(old, x, y)
    assert acc_new > 0.6 and acc_new > acc_old + 0.4, (acc_new, acc_old)

    assert worker.run_next() is False  # nothing queued any more


def test_skip_if_worse_ships_nothing(fleet):
    ctx, worker, device_id = fleet
    with transaction(ctx.factory) as s:
        v0 = latest_version(s).model_hash
    # A learning rate too small to change any prediction: validation accuracy ties the deployed
    # model's, which is not better, so the round is skipped.
    rid = queue(ctx, {"epochs": 1, "lr": 1e-12})
    generation = ctx.targets_changed.generation
    assert worker.run_next()
    rnd = get(ctx, rid)
    assert rnd.status == R.SKIPPED and "does not beat" in rnd.reason
    assert rnd.model_hash is None and rnd.metrics["val_accuracy"] <= rnd.metrics["base_val_accuracy"]
    with transaction(ctx.factory) as s:
        assert [v.model_hash for v in list_versions(s)] == [v0]
        assert s.get(Device, device_id).target_model_hash == v0
    assert ctx.targets_changed.generation == generation

    # Too few labelled samples: skipped before any training.
    rid = queue(ctx, {"min_labelled": N_LABELLED + 1})
    worker.run_next()
    rnd = get(ctx, rid)
    assert rnd.status == R.SKIPPED and f"only {N_LABELLED} labelled samples" in rnd.reason


BAD_ROUNDS = [
    ("full", {"epochs": 0}, "epochs"),
    ("full", {"lr": -1}, "lr"),
    ("full", {"learning_rate": 0.1}, "learning_rate"),
    ("no-such-method", {}, "unknown method"),
]


def _worker(ctx) -> RoundWorker:
    return RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                       targets_changed=ctx.targets_changed)


def test_bad_rounds_fail_with_a_reason(server_ctx):
    worker = _worker(server_ctx)
    for method, params, needle in BAD_ROUNDS:
        rid = queue(server_ctx, params, method=method)
        assert worker.run_next()
        rnd = get(server_ctx, rid)
        assert rnd.status == R.FAILED and needle in rnd.reason, rnd.reason
        assert rnd.finished_at is not None
    with transaction(server_ctx.factory) as s:
        assert s.query(ModelVersion).count() == 1
    assert worker.run_next() is False


def test_worker_thread_picks_up_queued_rounds_and_stops(server_ctx, wait_until):
    worker = _worker(server_ctx)
    worker.start()
    try:
        rid = queue(server_ctx, {})
        server_ctx.rounds_wakeup.notify()
        rnd = wait_until(lambda: (r := get(server_ctx, rid)).status in R.TERMINAL and r, 60, f"round {rid}")
        # No labelled samples at all: the policy declines, and says why.
        assert rnd.status == R.SKIPPED and "only 0 labelled samples" in rnd.reason
    finally:
        worker.stop()
    assert not worker._thread.is_alive()


def test_a_server_without_its_worker_leaves_rounds_to_a_worker_process(server_settings, wait_until):
    from server.app import EdgeLoopServer, WorkerProcess

    settings = server_settings.model_copy(update={"embedded_worker": False, "rest_host": "127.0.0.1",
                                                  "rest_port": 0, "grpc_host": "127.0.0.1", "grpc_port": 0})
    server = EdgeLoopServer(settings)
    server.start()
    try:
        assert server.worker is None
        rid = queue(server.ctx, {})
        worker = WorkerProcess(settings)  # its own context and engine, as another process has
        worker.start()
        try:
            rnd = wait_until(lambda: (r := get(server.ctx, rid)).status in R.TERMINAL and r, 60, f"round {rid}")
        finally:
            worker.stop()
        assert rnd.status == R.SKIPPED and rnd.worker_id == worker.worker.worker_id
    finally:
        server.stop()
