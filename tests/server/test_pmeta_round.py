"""p-Meta rounds through the real round worker on real digits: a first round from version 0
meta-trains and publishes a conv4/pmeta version with few-shot accuracy and its confidence
interval; the next round ships a diff against it; a non-p-Meta fleet fails the round clearly."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

import shared.codec as codec
from server.context import ServerContext
from server.db.engine import transaction
from server.db.models import Artefact
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.samples import SampleIn, ingest_samples
from server.domain.versions import get_version, latest_version, load_state
from server.settings import ServerSettings
from server.training.registry import POLICIES
from server.worker import RoundWorker
from shared.models import model_hash
from shared.pmeta.spec import pmeta_spec
from shared.samples import encode_sample, sample_id

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 5-way tasks on 8x8 digits: three conv blocks of 8 channels (8 -> 4 -> 2 -> 1) keep it quick.
ARCH = pmeta_spec((1, 8, 8), 5, channels=8, blocks=3)
PARAMS = {"iterations": 6, "shots": 2, "queries": 3, "meta_batch": 2, "val_tasks": 12}


@pytest.fixture
def server_settings(tmp_path):
    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                          model_arch_json=ARCH.to_json(), worker_poll_s=0.1, fsync=False)


@pytest.fixture
def fleet(server_ctx, digits):
    """A device that uploaded 300 labelled digits of all ten classes (a 5-way model's labels
    are class ids, so 5..9 are accepted too)."""
    ctx = server_ctx
    with transaction(ctx.factory) as s:
        dev = D.register_device(s, hardware_id="hw-pmeta").device
        samples = [SampleIn(sample_id(p := encode_sample(x)), p, int(y), {})
                   for x, y in zip(digits.x_train[:300], digits.y_train[:300], strict=True)]
        res = ingest_samples(s, ctx.blobs, dev, samples, arch=ctx.settings.arch,
                             max_bytes=ctx.settings.max_sample_bytes)
        assert res.accepted == 300, res.rejected[:2]
    worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    return ctx, worker


def _run(ctx, worker, params: dict) -> R.Round:
    with transaction(ctx.factory) as s:
        rid = R.create_round(s, method="pmeta", cohort={"all": True}, params=params).id
    assert worker.run_next() is True
    with transaction(ctx.factory) as s:
        rnd = R.get_round(s, rid)
        s.expunge(rnd)
    return rnd


def test_pmeta_rounds_meta_train_and_publish(fleet):
    ctx, worker = fleet
    with transaction(ctx.factory) as s:
        v0 = latest_version(s).model_hash
    first = _run(ctx, worker, PARAMS)
    assert first.status == R.DONE, first.reason
    m = first.metrics
    assert m["algorithm"] == "pmeta_att" and m["ways"] == 5 and m["meta_train_classes"] == 10
    assert 0 <= m["few_shot_accuracy"] <= 1 and math.isfinite(m["few_shot_ci95"]) and m["val_tasks"] == 12
    assert m["meta_iterations"] == 6 and "base_few_shot_accuracy" not in m  # v0 is no reference
    with transaction(ctx.factory) as s:
        v1 = get_version(s, first.model_hash)
        assert v1.method == "pmeta" and v1.parent_hash == v0
        arch, state = load_state(s, ctx.blobs, v1.model_hash)
        _, state0 = load_state(s, ctx.blobs, v0)
    assert arch == ARCH and "pmeta.alpha" in state and model_hash(arch, state) == v1.model_hash
    assert not all(bool((state[k] == state0[k]).all()) for k in state)  # it trained
    assert m["diff_bytes"] > 0  # a diff against version 0 ships beside the full model

    # A second round is judged against the first on the same held-out tasks and ships a diff.
    second = _run(ctx, worker, {**PARAMS, "skip_if_worse": False, "seed": 1})
    assert second.status == R.DONE, second.reason
    assert second.metrics["base_few_shot_accuracy"] is not None
    with transaction(ctx.factory) as s:
        _, state2 = load_state(s, ctx.blobs, second.model_hash)
        diff = s.scalars(select(Artefact).where(Artefact.target_model_hash == second.model_hash,
                                                Artefact.base_model_hash == first.model_hash)).one()
        data = ctx.blobs.path(diff.sha256).read_bytes()
    assert codec.decode_diff(data, state, base_arch=ARCH).model_hash == second.model_hash
    assert model_hash(ARCH, state2) == second.model_hash


def test_pmeta_params_are_validated_like_every_method():
    policy = POLICIES["pmeta"]
    with pytest.raises(ValueError, match="iterations"):
        policy.parse_params({"iterations": 0})
    with pytest.raises(ValueError, match="extra"):
        policy.parse_params({"no_such_param": 1})


def test_a_pmeta_round_on_a_plain_fleet_fails_with_a_reason(tmp_path):
    settings = ServerSettings(data_dir=tmp_path / "plain", database_url=f"sqlite:///{tmp_path / 'plain.db'}",
                              model_kind="mlp", input_shape="1,8,8", num_classes=10, fsync=False)
    ctx = ServerContext.open(settings)
    try:
        worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                             targets_changed=ctx.targets_changed)
        with transaction(ctx.factory) as s:
            rid = R.create_round(s, method="pmeta", cohort={"all": True}, params=PARAMS).id
        assert worker.run_next() is True
        with transaction(ctx.factory) as s:
            rnd = R.get_round(s, rid)
            assert rnd.status == R.FAILED and "p-Meta fleet model" in rnd.reason, rnd.reason
    finally:
        ctx.close()
