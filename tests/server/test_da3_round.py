"""DA³ rounds through the real round worker on real digits: a resnet backbone is pre-trained
for the whole fleet, then a ``da3`` round for one tag (a domain whose camera sees inverted
images) trains only that cohort's adaptor and head, keeps the backbone bit-identical, publishes
a version whose delivery is the signed ``da3/adaptor-v1`` artefact against the backbone, and
retargets only that cohort; a fleet whose model is not a resnet fails the round clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import select

from server.db.engine import transaction
from server.db.models import Artefact, Device
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.samples import SampleIn, ingest_samples
from server.domain.versions import get_version, latest_version, load_state, plan_update
from server.settings import ServerSettings
from server.signing import signatures_of
from server.worker import RoundWorker
from shared.artefacts import decode_artefact
from shared.da3.artefact import ADAPTOR_ENCODING, adaptor_names
from shared.models import ArchSpec
from shared.samples import encode_sample, sample_id

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BACKBONE = ArchSpec(kind="resnet", input_shape=(1, 8, 8), num_classes=10, hidden=(1, 1), channels=(8, 16))


@pytest.fixture
def server_settings(tmp_path):
    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                          model_arch_json=BACKBONE.to_json(), worker_poll_s=0.1, fsync=False)


def _upload(ctx, dev, x, y) -> None:
    with transaction(ctx.factory) as s:
        dev = s.get(Device, dev)
        samples = [SampleIn(sample_id(p := encode_sample(xi)), p, int(yi), {}) for xi, yi in zip(x, y, strict=True)]
        res = ingest_samples(s, ctx.blobs, dev, samples, arch=ctx.settings.arch,
                             max_bytes=ctx.settings.max_sample_bytes)
        assert res.accepted == len(x), res.rejected[:2]


def _run(ctx, worker, method: str, cohort: dict, params: dict) -> R.Round:
    with transaction(ctx.factory) as s:
        rid = R.create_round(s, method=method, cohort=cohort, params=params).id
    assert worker.run_next() is True
    with transaction(ctx.factory) as s:
        rnd = R.get_round(s, rid)
        s.expunge(rnd)
    return rnd


@pytest.fixture
def fleet(server_ctx, digits):
    """Two devices: ``plain`` sees digits as they are, ``night`` (tag ``site-night``) sees them
    inverted. The backbone is pre-trained on the plain device's digits for the whole fleet."""
    ctx = server_ctx
    with transaction(ctx.factory) as s:
        plain = D.register_device(s, hardware_id="hw-plain").device.id
        night = D.register_device(s, hardware_id="hw-night", tags=["site-night"]).device.id
    _upload(ctx, plain, digits.x_train[:400], digits.y_train[:400])
    worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    pre = _run(ctx, worker, "full", {"all": True}, {"epochs": 6, "skip_if_worse": False, "lr": 3e-3})
    assert pre.status == R.DONE, pre.reason
    inverted = (255 - digits.x_train[400:700]).astype(np.uint8)
    _upload(ctx, night, inverted, digits.y_train[400:700])
    return ctx, worker, plain, night, pre.model_hash


def test_da3_round_ships_only_the_adaptor_to_its_cohort(fleet):
    ctx, worker, plain, night, backbone_hash = fleet
    rnd = _run(ctx, worker, "da3", {"tag": "site-night"}, {"epochs": 8, "lr": 3e-3, "skip_if_worse": False})
    assert rnd.status == R.DONE, rnd.reason
    m = rnd.metrics
    assert m["train_samples"] + m["val_samples"] == 300  # the cohort's inverted digits only
    assert m["val_accuracy"] > m["base_val_accuracy"], m  # the adaptor learnt the new domain
    assert 0.0 <= m["gate_sparsity"] <= 1.0 and m["adaptor_bytes"] < m["full_model_bytes"] / 2
    with transaction(ctx.factory) as s:
        assert s.get(Device, night).target_model_hash == rnd.model_hash
        assert s.get(Device, plain).target_model_hash == backbone_hash  # not its cohort
        mv = get_version(s, rnd.model_hash)
        assert mv.parent_hash == backbone_hash and mv.lineage == "tag:site-night"
        arch, state = load_state(s, ctx.blobs, mv.model_hash)
        _, base = load_state(s, ctx.blobs, backbone_hash)
        adaptors = list(s.scalars(select(Artefact).where(Artefact.encoding == ADAPTOR_ENCODING)))
        assert len(adaptors) == 1
        art = adaptors[0]
        assert (art.base_model_hash, art.target_model_hash) == (backbone_hash, mv.model_hash)
        assert signatures_of(s, art.sha256), "the adaptor artefact is signed like every artefact"
        # What the cohort's device is sent (GetUpdate's planner): the adaptor, not the model.
        plan = plan_update(s, have_hash=backbone_hash, target_hash=mv.model_hash)
        assert plan.artefact.sha256 == art.sha256 and plan.chain_bytes == art.size
        full_size = s.get(Artefact, mv.full_artefact_sha256).size
        data = ctx.blobs.get(art.sha256)
    assert art.size * 2 < full_size  # 0.28x for this tiny backbone
    assert "da3" in arch.extra
    owned = set(adaptor_names(arch))
    assert owned and all(k.startswith("da3.") or k.startswith("head.") for k in owned)
    frozen = [k for k in state if k not in owned]
    assert frozen and all(torch.equal(state[k], base[k]) for k in frozen)  # bit-identical backbone
    assert any(not torch.equal(state[k], base[k]) for k in owned if k in base)  # the head moved
    decoded = decode_artefact(data, base, base_arch=BACKBONE)  # as the device decodes it
    assert decoded.model_hash == mv.model_hash and decoded.arch == arch


def test_da3_round_refuses_a_non_resnet_fleet(tmp_path, digits):
    from server.context import ServerContext

    mlp = ArchSpec(kind="mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))
    settings = ServerSettings(data_dir=tmp_path / "s2", database_url=f"sqlite:///{tmp_path / 'db2.sqlite'}",
                              model_arch_json=mlp.to_json(), worker_poll_s=0.1, fsync=False)
    ctx = ServerContext.open(settings)
    try:
        with transaction(ctx.factory) as s:
            dev = D.register_device(s, hardware_id="hw-a", tags=["site-a"]).device.id
        _upload(ctx, dev, digits.x_train[:40], digits.y_train[:40])
        worker = RoundWorker(ctx.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                             targets_changed=ctx.targets_changed)
        rnd = _run(ctx, worker, "da3", {"tag": "site-a"}, {"epochs": 1})
        assert rnd.status == R.FAILED and "resnet-kind base model" in rnd.reason and "'mlp'" in rnd.reason
        with transaction(ctx.factory) as s:
            assert latest_version(s).method == "init"  # nothing published
    finally:
        ctx.close()


def test_da3_params_are_validated():
    from pydantic import ValidationError

    from server.training.registry import get_policy

    policy = get_policy("da3")
    assert policy.parse_params({"epochs": 2, "gate": False}).gate is False
    for bad in ({"epochs": 0}, {"lr": -1}, {"temperature": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            policy.parse_params(bad)


def test_the_next_da3_round_readapts_from_the_cohorts_adaptor(fleet):
    """The cohort now runs the adapted model: the next round starts from its adaptor and ships
    an adaptor against it (the backbone still bit-identical)."""
    ctx, worker, _plain, night, backbone_hash = fleet
    params = {"epochs": 2, "lr": 3e-3, "skip_if_worse": False}
    first = _run(ctx, worker, "da3", {"tag": "site-night"}, params)
    second = _run(ctx, worker, "da3", {"tag": "site-night"}, {**params, "seed": 1})
    assert (first.status, second.status) == (R.DONE, R.DONE), (first.reason, second.reason)
    with transaction(ctx.factory) as s:
        assert get_version(s, second.model_hash).parent_hash == first.model_hash
        assert s.get(Device, night).target_model_hash == second.model_hash
        art = s.scalars(select(Artefact).where(Artefact.target_model_hash == second.model_hash,
                                               Artefact.encoding == ADAPTOR_ENCODING)).one()
        assert art.base_model_hash == first.model_hash
        arch1, s1 = load_state(s, ctx.blobs, first.model_hash)
        _, s2 = load_state(s, ctx.blobs, second.model_hash)
        _, base = load_state(s, ctx.blobs, backbone_hash)
        data = ctx.blobs.get(art.sha256)
    owned = set(adaptor_names(arch1))
    assert all(torch.equal(s2[k], base[k]) for k in s2 if k not in owned)
    assert decode_artefact(data, s1, base_arch=arch1).model_hash == second.model_hash


def test_other_methods_build_on_the_backbone_not_on_a_cohorts_adaptor(fleet):
    """After a da3 round the cohort runs the adapted model; a ``full`` round for it trains the
    fleet backbone (its parent) and publishes a plain model, which drops the adaptor (the next
    da3 round re-adapts)."""
    ctx, worker, _plain, night, backbone_hash = fleet
    adapted = _run(ctx, worker, "da3", {"tag": "site-night"}, {"epochs": 1, "skip_if_worse": False})
    full = _run(ctx, worker, "full", {"tag": "site-night"}, {"epochs": 1, "skip_if_worse": False})
    assert (adapted.status, full.status) == (R.DONE, R.DONE), (adapted.reason, full.reason)
    with transaction(ctx.factory) as s:
        mv = get_version(s, full.model_hash)
        assert mv.parent_hash == backbone_hash and "da3" not in ArchSpec.from_json(mv.arch_json).extra
        assert s.get(Device, night).target_model_hash == full.model_hash
