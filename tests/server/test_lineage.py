"""Cohort lineage on SQLite and PostgreSQL: samples keep where they came from, a round's data
is its cohort's, each cohort builds on the version it runs, and delivery plans a device's
path across heads (a diff chain where one exists, else the full model)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from server.db.engine import transaction
from server.db.models import Device
from server.domain import devices as D
from server.domain.lineage import base_version
from server.domain.samples import LabelledData, SampleCache, load_labelled
from server.domain.versions import add_artefact, latest_version, plan_update, publish_version
from shared.artefacts import SEED_MODEL_ENCODING, encode_seed_model
from shared.data import load_dataset
from shared.models import build_model, init_weights_from_seed
from shared.samples import encode_sample, sample_id
from tests.server.test_rest_api import ingest, register


@pytest.fixture(scope="module")
def fmnist():
    ds = load_dataset("fashion-mnist")
    return ds.x_test[:300], ds.y_test[:300]


def _register(ctx, hardware_id: str, tags: list[str]) -> str:
    return register(ctx, hardware_id, tags=tags).device.id


def _ingest(ctx, device_id: str, xs, ys) -> list[str]:
    return ingest(ctx, device_id, xs, [int(y) for y in ys])


def _ids(data: LabelledData) -> dict[str, str]:
    """sample id -> device id, over both splits."""
    out = {}
    for xs, devs in ((data.x_train, data.device_ids_train), (data.x_val, data.device_ids_val)):
        for x, d in zip(xs, devs, strict=True):
            out[sample_id(encode_sample(x))] = str(d)
    return out


def test_labelled_data_keeps_device_and_tags_and_filters_by_cohort(server_ctx, fmnist):
    x, y = fmnist
    server_ctx.blobs.fsync = False
    a = _register(server_ctx, "hw-a", ["site-a", "cam"])
    b = _register(server_ctx, "hw-b", ["site-b"])
    c = _register(server_ctx, "hw-c", ["site-a"])
    from_a, from_b, from_c = _ingest(server_ctx, a, x[:100], y[:100]), _ingest(server_ctx, b, x[100:180], y[100:180]), \
        _ingest(server_ctx, c, x[180:200], y[180:200])
    cache, arch, frac = SampleCache(server_ctx.blobs), server_ctx.settings.arch, server_ctx.settings.val_fraction
    with transaction(server_ctx.factory) as s:
        every = load_labelled(s, cache, arch, frac)
        site_a = load_labelled(s, cache, arch, frac, device_ids=[a, c])
        only_b = load_labelled(s, cache, arch, frac, device_ids=[b])
        none = load_labelled(s, cache, arch, frac, device_ids=[])
    assert every.total == 200 and site_a.total == 120 and only_b.total == 80 and none.total == 0
    origin = _ids(every)
    assert {sid: origin[sid] for sid in from_a} == dict.fromkeys(from_a, a)
    assert {origin[sid] for sid in from_b} == {b} and {origin[sid] for sid in from_c} == {c}
    assert set(_ids(site_a)) == set(from_a) | set(from_c) and set(_ids(only_b)) == set(from_b)
    # Tags are the uploading device's, aligned with the samples; labels stay with their images.
    for data in (every, site_a):
        for devs, tags in ((data.device_ids_train, data.tags_train), (data.device_ids_val, data.tags_val)):
            assert len(devs) == len(tags)
            for d, t in zip(devs, tags, strict=True):
                assert t == {a: ("cam", "site-a"), b: ("site-b",), c: ("site-a",)}[str(d)]
    lookup = dict(zip(from_a + from_b + from_c, y[:200].tolist(), strict=True))
    assert [lookup[sample_id(encode_sample(v))] for v in only_b.x_train] == only_b.y_train.tolist()


def test_labelled_data_built_in_code_gets_aligned_empty_origins():
    x = np.zeros((5, 1, 28, 28), np.uint8)
    d = LabelledData(x[:3], np.arange(3), x[3:], np.arange(2))
    assert d.device_ids_train.tolist() == ["", "", ""] and d.tags_val.tolist() == [(), ()] and d.total == 5
    with pytest.raises(ValueError, match="aligned"):
        LabelledData(x[:3], np.arange(3), x[3:], np.arange(2), device_ids_train=np.array(["a"]))


def _state(ctx, seed: int) -> dict[str, torch.Tensor]:
    return init_weights_from_seed(build_model(ctx.settings.arch), seed).state_dict()


def _publish(ctx, seed: int, parent: str | None, lineage: str, **kw):
    with transaction(ctx.factory) as s:
        return publish_version(s, ctx.blobs, arch=ctx.settings.arch, state=kw.pop("state", None) or _state(ctx, seed),
                               parent_hash=parent, method=kw.pop("method", "dpu"), metrics={}, lineage=lineage, **kw)


def _target(ctx, device_ids: list[str], model_hash: str) -> None:
    with transaction(ctx.factory) as s:
        for d in device_ids:
            s.get(Device, d).target_model_hash = model_hash


def _base(ctx, tag: str | None, lineage: str):
    with transaction(ctx.factory) as s:
        devices = D.resolve_cohort(s, {"tag": tag} if tag else {"all": True})
        mv = base_version(s, devices, lineage)
        return mv.model_hash if mv else None


def test_each_cohort_builds_on_the_version_it_runs(server_ctx):
    a1, a2 = _register(server_ctx, "hw-a1", ["a"]), _register(server_ctx, "hw-a2", ["a"])
    b1 = _register(server_ctx, "hw-b1", ["b"])
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s).model_hash
    # New devices run the fleet default: every cohort starts from it.
    assert _base(server_ctx, "a", "tag:a") == _base(server_ctx, "b", "tag:b") == v0
    # Two heads: cohort a runs A1, cohort b runs B1.
    va = _publish(server_ctx, 1, v0, "tag:a")
    vb = _publish(server_ctx, 2, v0, "tag:b")
    _target(server_ctx, [a1, a2], va.model_hash)
    _target(server_ctx, [b1], vb.model_hash)
    assert _base(server_ctx, "a", "tag:a") == va.model_hash
    assert _base(server_ctx, "b", "tag:b") == vb.model_hash
    with transaction(server_ctx.factory) as s:
        assert latest_version(s, "tag:a").model_hash == va.model_hash
        assert latest_version(s).model_hash == vb.model_hash  # the newest of all is b's
    # The majority of the cohort decides; a tie goes to the newer version.
    _target(server_ctx, [a2], vb.model_hash)
    assert _base(server_ctx, "a", "tag:a") == vb.model_hash
    va2 = _publish(server_ctx, 3, va.model_hash, "tag:a")
    _target(server_ctx, [a1], va2.model_hash)
    assert _base(server_ctx, "a", "tag:a") == va2.model_hash
    _target(server_ctx, [a2], va2.model_hash)
    # A cohort with no devices (or none with a target): its lineage's head, else the fleet default.
    assert _base(server_ctx, "nobody", "tag:a") == va2.model_hash
    assert _base(server_ctx, "nobody", "tag:nobody") == v0
    fleet = _publish(server_ctx, 4, v0, "all", method="full", fleet_default=True)
    assert _base(server_ctx, "nobody", "tag:nobody") == fleet.model_hash
    with transaction(server_ctx.factory) as s:  # a target naming no known version is ignored
        s.get(Device, b1).target_model_hash = "e" * 64
    assert _base(server_ctx, "b", "tag:b") == vb.model_hash


def _plan(ctx, have: str, target: str):
    with transaction(ctx.factory) as s:
        p = plan_update(s, have_hash=have, target_hash=target)
        return p.artefact.sha256, p.chain_bytes


def test_delivery_plans_each_device_path_across_heads(server_ctx):
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s).model_hash
    a1 = _publish(server_ctx, 1, v0, "tag:a")
    a2 = _publish(server_ctx, 2, a1.model_hash, "tag:a")
    b1 = _publish(server_ctx, 3, v0, "tag:b")
    with transaction(server_ctx.factory) as s:
        d01 = add_artefact(s, server_ctx.blobs, os.urandom(500), encoding="diff/t", target_hash=a1.model_hash, base_hash=v0)
        d12 = add_artefact(s, server_ctx.blobs, os.urandom(600), encoding="diff/t", target_hash=a2.model_hash,
                           base_hash=a1.model_hash)
        d0b = add_artefact(s, server_ctx.blobs, os.urandom(700), encoding="diff/t", target_hash=b1.model_hash, base_hash=v0)
    full_b1 = (b1.full_artefact_sha256, server_ctx.blobs.size(b1.full_artefact_sha256))
    # Along a head: the diff chain.
    assert _plan(server_ctx, v0, a2.model_hash) == (d01.sha256, 1100)
    assert _plan(server_ctx, a1.model_hash, a2.model_hash) == (d12.sha256, 600)
    assert _plan(server_ctx, v0, b1.model_hash) == (d0b.sha256, 700)
    # A device of head a moved to head b: diffs only go forward, so the full model.
    assert _plan(server_ctx, a2.model_hash, b1.model_hash) == full_b1
    # ...unless b re-initialised: the seed reaches the seeded weights from any model (DPU §5.4.2).
    seeded = _publish(server_ctx, 77, b1.model_hash, "tag:b", method="reinit",
                      state=_state(server_ctx, 77), reinit_seed=77)
    b2 = _publish(server_ctx, 5, seeded.model_hash, "tag:b")
    with transaction(server_ctx.factory) as s:
        seed_art = add_artefact(s, server_ctx.blobs, encode_seed_model(server_ctx.settings.arch, 77, seeded.model_hash),
                                encoding=SEED_MODEL_ENCODING, target_hash=seeded.model_hash)
        add_artefact(s, server_ctx.blobs, os.urandom(800), encoding="diff/t", target_hash=b2.model_hash,
                     base_hash=seeded.model_hash)
    assert _plan(server_ctx, a2.model_hash, b2.model_hash) == (seed_art.sha256, seed_art.size + 800)
