"""Model versions and artefacts: publishing, numbering, loading, and the choice between a diff
chain and the full model, on SQLite and PostgreSQL."""

from __future__ import annotations

import os

import pytest
import torch
from sqlalchemy import func, select

from server.db.engine import transaction
from server.db.models import Artefact, ModelVersion
from server.domain.errors import NotFoundError
from server.domain.versions import (
    add_artefact,
    ensure_initial_version,
    get_version,
    latest_version,
    list_versions,
    load_state,
    plan_update,
    publish_version,
)
from shared.artefacts import FULL_MODEL_ENCODING, decode_artefact
from shared.models import build_model, init_weights_from_seed, model_hash


def _state(ctx, seed: int) -> dict[str, torch.Tensor]:
    return init_weights_from_seed(build_model(ctx.settings.arch), seed).state_dict()


def _publish(ctx, seed: int, parent: str | None, **kw) -> ModelVersion:
    with transaction(ctx.factory) as s:
        return publish_version(s, ctx.blobs, arch=ctx.settings.arch, state=_state(ctx, seed), parent_hash=parent,
                               method=kw.pop("method", "full"), metrics=kw.pop("metrics", {}), **kw)


def test_version_zero_is_the_seeded_untrained_model(server_ctx):
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s)
        assert v0.number == 0 and v0.method == "init" and v0.fleet_default and v0.parent_hash is None
        assert v0.reinit_seed == server_ctx.settings.init_seed
        assert v0.model_hash == model_hash(server_ctx.settings.arch, _state(server_ctx, server_ctx.settings.init_seed))
        arch, state = load_state(s, server_ctx.blobs, v0.model_hash)
        assert arch == server_ctx.settings.arch and model_hash(arch, state) == v0.model_hash
        art = s.get(Artefact, v0.full_artefact_sha256)
        assert art.encoding == FULL_MODEL_ENCODING and art.base_model_hash is None
        assert art.target_model_hash == v0.model_hash and art.size == server_ctx.blobs.size(art.sha256)
        # Opening the server again does not publish another version 0.
        assert ensure_initial_version(s, server_ctx.blobs, server_ctx.settings.arch, 99).model_hash == v0.model_hash
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 1


def test_publish_numbers_versions_and_is_idempotent(server_ctx):
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s).model_hash
    v1 = _publish(server_ctx, 1, v0, metrics={"val_accuracy": 0.5}, round_id="r1")
    v2 = _publish(server_ctx, 2, v1.model_hash)
    assert (v1.number, v2.number) == (1, 2)
    again = _publish(server_ctx, 1, v0, fleet_default=True)  # the same model published twice
    assert again.model_hash == v1.model_hash and again.number == 1
    with transaction(server_ctx.factory) as s:
        assert [v.number for v in list_versions(s)] == [0, 1, 2]
        assert get_version(s, v1.model_hash).fleet_default  # the flag is only ever raised
        assert latest_version(s).model_hash == v2.model_hash
        assert get_version(s, v2.model_hash).parent_hash == v1.model_hash
        data = server_ctx.blobs.get(get_version(s, v2.model_hash).full_artefact_sha256)
        assert decode_artefact(data).parent_hash == v1.model_hash
        assert get_version(s, v1.model_hash).metrics == {"val_accuracy": 0.5}
        with pytest.raises(NotFoundError):
            get_version(s, "0" * 64)


def test_add_artefact_is_idempotent(server_ctx):
    data = os.urandom(300)
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s).model_hash
        a = add_artefact(s, server_ctx.blobs, data, encoding="diff/x", target_hash="1" * 64, base_hash=v0)
        b = add_artefact(s, server_ctx.blobs, data, encoding="diff/x", target_hash="1" * 64, base_hash=v0)
        assert a.sha256 == b.sha256 and a.size == 300
        assert s.scalar(select(func.count()).select_from(Artefact).where(Artefact.encoding == "diff/x")) == 1


def _diff(ctx, base: str, target: str, size: int) -> str:
    with transaction(ctx.factory) as s:
        return add_artefact(s, ctx.blobs, os.urandom(size), encoding="diff/test", target_hash=target,
                            base_hash=base).sha256


def _plan(ctx, have: str, target: str):
    with transaction(ctx.factory) as s:
        p = plan_update(s, have_hash=have, target_hash=target)
        return p.artefact.sha256, p.chain_bytes, p.final_hash


def test_plan_update_takes_the_fewest_bytes(server_ctx):
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s)
    v1 = _publish(server_ctx, 1, v0.model_hash)
    v2 = _publish(server_ctx, 2, v1.model_hash)
    full2 = v2.full_artefact_sha256
    full_size = server_ctx.blobs.size(full2)
    h0, h1, h2 = v0.model_hash, v1.model_hash, v2.model_hash

    # Nothing installed, or no diff path: the full model.
    assert _plan(server_ctx, "", h2) == (full2, full_size, h2)
    assert _plan(server_ctx, h0, h2) == (full2, full_size, h2)

    # A chain v0 -> v1 -> v2 of small diffs: its first hop, with the chain's total bytes.
    d01 = _diff(server_ctx, h0, h1, 1000)
    d12 = _diff(server_ctx, h1, h2, 2000)
    assert _plan(server_ctx, h0, h2) == (d01, 3000, h2)
    assert _plan(server_ctx, h1, h2) == (d12, 2000, h2)
    # A direct diff that is cheaper than the chain wins; one that is dearer does not.
    _diff(server_ctx, h0, h2, 3500)
    assert _plan(server_ctx, h0, h2)[0] == d01
    d02 = _diff(server_ctx, h0, h2, 2500)
    assert _plan(server_ctx, h0, h2) == (d02, 2500, h2)
    # Already on the target: there is no diff from a model to itself; the full model is named.
    assert _plan(server_ctx, h2, h2)[0] == full2
    with pytest.raises(NotFoundError):
        _plan(server_ctx, h0, "f" * 64)


def test_plan_update_prefers_the_full_model_when_diffs_are_bigger(server_ctx):
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s)
    v1 = _publish(server_ctx, 1, v0.model_hash)
    full_size = server_ctx.blobs.size(v1.full_artefact_sha256)
    _diff(server_ctx, v0.model_hash, v1.model_hash, full_size + 1)
    assert _plan(server_ctx, v0.model_hash, v1.model_hash) == (v1.full_artefact_sha256, full_size, v1.model_hash)
    # Equal size: the full model (it needs no base to be right).
    _diff(server_ctx, v0.model_hash, v1.model_hash, full_size)
    assert _plan(server_ctx, v0.model_hash, v1.model_hash)[0] == v1.full_artefact_sha256
