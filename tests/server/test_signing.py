"""Server side of signed artefacts (SQLite and PostgreSQL): every artefact is signed as it is
published, the key file is created once with mode 0600 and never replaced silently, GetUpdate
and Register carry what agents verify with, and external signing keeps unsigned artefacts from
agents until a valid signature is uploaded."""

from __future__ import annotations

import json
import os
import stat

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from typer.testing import CliRunner

from protos.edgeloop.v1 import fleet_pb2 as pb
from server import signing
from server.context import ServerContext
from server.db.engine import transaction
from server.db.models import Artefact, ArtefactSignatureRecord, ModelVersion, SigningKey
from server.domain.versions import add_artefact, publish_version
from shared import signing as sig
from shared.models import build_model, init_weights_from_seed
from tests.server.grpc_fleet import md


def _publish(ctx, seed: int) -> ModelVersion:
    state = init_weights_from_seed(build_model(ctx.settings.arch), seed).state_dict()
    with transaction(ctx.factory) as s:
        return publish_version(s, ctx.blobs, arch=ctx.settings.arch, state=state, parent_hash=None, method="full",
                               metrics={}, fleet_default=True)


def _trusted(ctx) -> dict[str, bytes]:
    with transaction(ctx.factory) as s:
        return {r.key_id: bytes(r.public_key) for r in s.scalars(select(SigningKey))}


def test_every_artefact_is_signed_as_published(server_ctx):
    path = signing.key_path(server_ctx.settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    trusted = _trusted(server_ctx)
    assert list(trusted) == [signing.LocalSigner(path).key_id]
    mv = _publish(server_ctx, seed=3)
    with transaction(server_ctx.factory) as s:
        diff_like = add_artefact(s, server_ctx.blobs, b"any artefact kind to come", encoding="pmeta/v1",
                                 target_hash=mv.model_hash, base_hash=mv.model_hash)
        arts = list(s.scalars(select(Artefact)))
        assert diff_like in arts and len(arts) == 3  # version 0, this version, the new kind
        for art in arts:
            [row] = signing.signatures_of(s, art.sha256)
            sig.verify_artefact(trusted, signing.statement(art, row.key_id), bytes(row.signature))


def test_start_refuses_a_lost_foreign_or_loose_key(server_ctx, server_settings):
    path = signing.key_path(server_settings)
    original = path.read_bytes()
    path.unlink()
    with pytest.raises(signing.SigningSetupError, match="missing but the database trusts"):
        ServerContext.open(server_settings)
    assert not path.exists()  # no fresh key made behind the operator's back
    signing.write_key_file(path, Ed25519PrivateKey.generate())
    with pytest.raises(signing.SigningSetupError, match="not one the database trusts"):
        ServerContext.open(server_settings)
    path.unlink()
    signing.write_key_file(path, sig.load_private_key_pem(original))
    os.chmod(path, 0o644)
    with pytest.raises(signing.SigningSetupError, match="readable by group or others"):
        ServerContext.open(server_settings)
    os.chmod(path, 0o600)
    ServerContext.open(server_settings).close()  # the right key: starts again


def test_register_and_get_update_carry_keys_signatures_and_statements(fleet, server_ctx):
    reg = fleet.register()
    trusted = _trusted(server_ctx)
    assert [sig.key_id(k) for k in reg.signing_public_keys] == list(trusted)
    rot = signing.rotate(server_ctx.settings, server_ctx.factory, server_ctx.blobs)
    first = next(iter(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(reg.device_credential), timeout=10)))
    info = first.info
    assert {s.key_id for s in info.signatures} == {rot.old_key_id, rot.new_key_id}
    [ann] = info.key_announcements
    st = sig.verify_key_statement(trusted, ann.statement, ann.signature)
    assert st.key_id == rot.new_key_id and st.signer_key_id == rot.old_key_id
    trusted_after = {**trusted, rot.new_key_id: st.public_key}
    for s in info.signatures:
        statement = sig.artefact_statement(
            artefact_sha256=info.artefact_sha256, encoding=info.encoding, size=info.artefact_size,
            target_model_hash=info.target_model_hash, base_model_hash=info.base_model_hash, key_id=s.key_id)
        sig.verify_artefact(trusted_after, statement, s.signature)
    # The up-to-date answer names no artefact and carries no signature.
    done = next(iter(fleet.stub.GetUpdate(pb.GetUpdateRequest(have_model_hash=info.target_model_hash),
                                          metadata=md(reg.device_credential), timeout=10))).info
    assert done.artefact_sha256 == "" and not done.signatures


def test_rotation_skips_what_the_old_key_does_not_vouch_for(server_ctx):
    mv = _publish(server_ctx, seed=4)
    with transaction(server_ctx.factory) as s:  # a row edited behind the signer's back
        s.get(Artefact, mv.full_artefact_sha256).encoding = "model/other"
    rot = signing.rotate(server_ctx.settings, server_ctx.factory, server_ctx.blobs)
    assert rot.resigned == 1 and len(rot.skipped) == 1 and "does not verify" in rot.skipped[0]
    with transaction(server_ctx.factory) as s:
        assert {r.key_id for r in signing.signatures_of(s, mv.full_artefact_sha256)} == {rot.old_key_id}


@pytest.fixture
def external_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def server_settings(tmp_path, db_url, external_key, request):
    from server.settings import ServerSettings

    extra = {}
    if "external" in request.node.name:
        extra = {"signing_mode": "external", "signing_public_key": sig.raw_public_key(external_key).hex()}
    return ServerSettings(data_dir=tmp_path / "server", database_url=db_url, model_kind="mlp", input_shape="1,28,28",
                          num_classes=10, heartbeat_interval_s=0.5, watch_keepalive_s=0.5, **extra)


def test_external_signing_holds_artefacts_back_until_a_signature_is_uploaded(
    server_ctx, fleet, client, external_key, tmp_path
):
    assert not signing.key_path(server_ctx.settings).exists()  # no key on the server
    reg = fleet.register()
    assert reg.signing_public_keys == [sig.raw_public_key(external_key)]
    with pytest.raises(grpc.RpcError) as err:
        next(iter(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(reg.device_credential), timeout=10)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not signed yet" in err.value.details()

    unsigned = client.get("/api/v1/artefacts/unsigned")
    assert unsigned.status_code == 200 and unsigned.json()["count"] == 1
    statements = tmp_path / "unsigned.json"
    statements.write_text(unsigned.text)
    keyfile = tmp_path / "holder.key"
    signing.write_key_file(keyfile, external_key)
    from edgeloop.cli import app

    out = CliRunner().invoke(app, ["sign", "statements", "--key", str(keyfile), str(statements)])
    assert out.exit_code == 0, out.output
    [line] = out.output.strip().splitlines()
    body = json.loads(line)
    sha = body.pop("artefact_sha256")

    bad = {**body, "signature": ("00" if body["signature"][:2] != "00" else "11") + body["signature"][2:]}
    r = client.put(f"/api/v1/artefacts/{sha}/signature", json=bad)
    assert r.status_code == 422 and "signature refused" in r.json()["detail"]
    r = client.put(f"/api/v1/artefacts/{sha}/signature", json={**body, "key_id": "ab" * 32})
    assert r.status_code == 422 and "not a trusted signing key" in r.json()["detail"]
    r = client.put(f"/api/v1/artefacts/{sha}/signature", json=body)
    assert r.status_code == 200, r.text
    assert client.put(f"/api/v1/artefacts/{sha}/signature", json=body).status_code == 200  # idempotent
    assert client.get("/api/v1/artefacts/unsigned").json()["count"] == 0
    keys = client.get("/api/v1/signing/keys").json()
    assert keys["mode"] == "external" and keys["data"][0]["public_key"] == sig.raw_public_key(external_key).hex()

    info = next(iter(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(reg.device_credential),
                                          timeout=10))).info
    assert [(s.key_id, s.signature.hex()) for s in info.signatures] == [(body["key_id"], body["signature"])]
    with transaction(server_ctx.factory) as s:
        assert len(s.scalars(select(ArtefactSignatureRecord)).all()) == 1


def test_signature_upload_needs_admin(client, server_ctx):
    from server.domain import operators

    with transaction(server_ctx.factory) as s:
        _, reader = operators.create_token(s, name="reader", scope="read")
    r = client.put(f"/api/v1/artefacts/{'a' * 64}/signature", json={"key_id": "a" * 64, "signature": "b" * 128},
                   headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403


def test_cli_show_rotate_retire(server_ctx, tmp_path):
    from edge_agent.trust import read_pinned_file
    from edgeloop.cli import app

    where = ["--data-dir", str(server_ctx.settings.data_dir), "--database-url", server_ctx.settings.database_url]
    runner = CliRunner()
    [old] = _trusted(server_ctx)
    rotated = runner.invoke(app, ["server", "signing", "rotate", *where])
    assert rotated.exit_code == 0, rotated.output
    new = json.loads(rotated.stdout[: rotated.stdout.rindex("}") + 1])["new_key_id"]
    assert runner.invoke(app, ["server", "signing", "retire", *where, new]).exit_code == 2  # the current key
    assert runner.invoke(app, ["server", "signing", "retire", *where, old]).exit_code == 0
    shown = runner.invoke(app, ["server", "signing", "show", *where])
    pins = tmp_path / "pins.txt"
    pins.write_text(shown.stdout)
    assert [sig.key_id(k) for k in read_pinned_file(pins)] == [new]  # the retired key is a comment
