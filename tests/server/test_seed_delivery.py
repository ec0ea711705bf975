"""Seed artefacts end to end over real gRPC (docs/seed-format.md, docs/protocol.md "Declining
seeds"): what the server publishes for a re-initialisation decodes on the agent's path to the
promised model; a client that sends no have_model_hash gets the full model instead; seed-v1
artefacts left in a database are never planned."""

from __future__ import annotations

import hashlib

import pytest

from protos.edgeloop.v1 import fleet_pb2 as pb
from server.db.engine import transaction
from server.domain.versions import add_artefact, add_seed_artefact, latest_version, publish_version
from shared.artefacts import (
    DEFAULT_MAX_PARAMETERS,
    FULL_MODEL_ENCODING,
    LEGACY_SEED_ENCODING,
    SEED_MODEL_ENCODING,
    ArtefactError,
    decode_artefact,
)
from shared.models import build_model, init_weights_from_seed
from tests.server.grpc_fleet import Fleet, md

SEED = 77


def _reinit_version(ctx) -> str:
    """A re-initialised version and its seed artefact, published as the worker does (DPU §5.4.2)."""
    arch = ctx.settings.arch
    state = init_weights_from_seed(build_model(arch), SEED).state_dict()
    with transaction(ctx.factory) as s:
        parent = latest_version(s).model_hash
        mv = publish_version(s, ctx.blobs, arch=arch, state=state, parent_hash=parent, method="reinit",
                             metrics={}, reinit_seed=SEED)
        add_seed_artefact(s, ctx.blobs, arch, SEED, mv.model_hash)
        return mv.model_hash


def _fetch(fleet: Fleet, cred: str, **req) -> tuple[pb.UpdateInfo, bytes]:
    msgs = list(fleet.stub.GetUpdate(pb.GetUpdateRequest(**req), metadata=md(cred), timeout=60))
    data = b"".join(m.chunk.data for m in msgs[1:])
    assert hashlib.sha256(data).hexdigest() == msgs[0].info.artefact_sha256
    return msgs[0].info, data


def test_server_made_seed_decodes_on_the_agent_path(fleet):
    reg = fleet.register()
    target = _reinit_version(fleet.ctx)
    info, data = _fetch(fleet, reg.device_credential, target_model_hash=target,
                        have_model_hash=reg.target_model_hash)
    assert info.encoding == SEED_MODEL_ENCODING and info.target_model_hash == target
    assert data.startswith(b"ELSEED2\n") and len(data) < 1024  # a few hundred bytes, not the model
    # what edge_agent/updater.py's verify does with a downloaded artefact
    decoded = decode_artefact(data, None, max_parameters=DEFAULT_MAX_PARAMETERS)
    assert decoded.model_hash == target and decoded.arch == fleet.ctx.settings.arch


def test_a_client_that_declines_seeds_gets_the_full_model(fleet):
    reg = fleet.register()
    target = _reinit_version(fleet.ctx)
    info, data = _fetch(fleet, reg.device_credential, target_model_hash=target)  # no have_model_hash
    assert info.encoding == FULL_MODEL_ENCODING and info.base_model_hash == ""
    assert decode_artefact(data).model_hash == target


def test_seed_v1_artefacts_in_the_database_are_never_planned(fleet):
    reg = fleet.register()
    target = _reinit_version(fleet.ctx)
    with transaction(fleet.ctx.factory) as s:  # a tiny legacy row, cheaper than anything else
        add_artefact(s, fleet.ctx.blobs, b"ELSEED1\n{}", encoding=LEGACY_SEED_ENCODING, target_hash=target)
    info, _ = _fetch(fleet, reg.device_credential, target_model_hash=target, have_model_hash="ab" * 32)
    assert info.encoding == SEED_MODEL_ENCODING


def test_server_refuses_to_publish_a_seed_that_does_not_regenerate_the_version(server_ctx):
    arch = server_ctx.settings.arch
    with transaction(server_ctx.factory) as s:
        v0 = latest_version(s).model_hash  # the version of settings.init_seed, not of SEED
        with pytest.raises(ArtefactError, match="generates model"):
            add_seed_artefact(s, server_ctx.blobs, arch, SEED, v0)
