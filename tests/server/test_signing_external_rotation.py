"""Rotation and retirement of an external key holder's key (signing_mode=external,
docs/security.md#artefact-signing-keys): the holder rotates offline (`edgeloop sign rotate`),
uploads the key statement, countersigns with the new key, then retires the old one; an agent
that pinned the old key at enrollment follows (its real TrustStore) and installs artefacts
signed only by the new key. Forged or replayed statements are refused and change nothing."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_agent.trust import TrustStore
from edgeloop.cli import app as cli
from protos.edgeloop.v1 import fleet_pb2 as pb
from server import signing
from shared import signing as sig
from tests.server.grpc_fleet import md
from tests.server.test_rest_api import make_client

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def holder(tmp_path):
    path = tmp_path / "holder.key"
    signing.write_key_file(path, Ed25519PrivateKey.generate())
    return path


@pytest.fixture
def server_settings(tmp_path, db_url, holder):
    from server.settings import ServerSettings

    public = sig.raw_public_key(signing.read_key_file(holder)).hex()
    return ServerSettings(data_dir=tmp_path / "server", database_url=db_url, model_kind="mlp", input_shape="1,28,28",
                          num_classes=10, heartbeat_interval_s=0.5, watch_keepalive_s=0.5,
                          signing_mode="external", signing_public_key=public, rest_auth_fail_rate_per_s=0)


def _cli(*args: str) -> str:
    out = CliRunner().invoke(cli, list(args))
    assert out.exit_code == 0, out.output
    return out.stdout


def _countersign(client, key, tmp_path, key_id: str | None = None) -> int:
    params = {"key_id": key_id} if key_id else {}
    todo = tmp_path / "todo.json"
    todo.write_text(client.get("/api/v1/artefacts/unsigned", params=params).text)
    lines = _cli("sign", "statements", "--key", str(key), str(todo)).strip().splitlines()
    for line in lines:
        body = json.loads(line)
        r = client.put(f"/api/v1/artefacts/{body.pop('artefact_sha256')}/signature", json=body)
        assert r.status_code == 200, r.text
    return len(lines)


def _info(fleet, credential: str) -> pb.UpdateInfo:
    return next(iter(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=md(credential), timeout=10))).info


def test_the_key_holder_rotates_and_retires_and_an_agent_follows(server_ctx, fleet, holder, tmp_path):
    client = make_client(server_ctx)
    old_key = signing.read_key_file(holder)
    old_id = sig.key_id(sig.raw_public_key(old_key))
    reg = fleet.register()
    agent = TrustStore(tmp_path / "agent")
    agent.pin_at_enrollment(reg.signing_public_keys)
    assert set(agent.keys()) == {old_id}
    assert _countersign(client, holder, tmp_path) == 1  # the first model, signed by the old key

    # 1. Rotate offline; upload the statement (the new key signed by the old one).
    new_path = tmp_path / "holder-2.key"
    rotation = json.loads(_cli("sign", "rotate", "--key", str(holder), "--out", str(new_path)))
    new_id = sig.key_id(sig.raw_public_key(signing.read_key_file(new_path)))
    r = client.post("/api/v1/signing/statements", json=rotation)
    assert r.status_code == 200 and r.json()["key_id"] == new_id and r.json()["signer_key_id"] == old_id, r.text
    assert client.post("/api/v1/signing/statements", json=rotation).json()["id"] == r.json()["id"]  # idempotent
    # 2. Countersign with the new key what it has not signed yet.
    assert _countersign(client, new_path, tmp_path, key_id=new_id) == 1
    assert client.get("/api/v1/artefacts/unsigned", params={"key_id": new_id}).json()["count"] == 0
    # 3. Retire the old key (a statement by the new one).
    retire = json.loads(_cli("sign", "retire", "--key", str(new_path), old_id))
    assert client.post("/api/v1/signing/statements", json=retire).status_code == 200
    keys = {k["key_id"]: k["retired_at"] for k in client.get("/api/v1/signing/keys").json()["data"]}
    assert keys[new_id] is None and keys[old_id] is not None
    assert fleet.register("hw-new").signing_public_keys == [sig.raw_public_key(signing.read_key_file(new_path))]

    # The agent that pinned only the old key follows the statements and accepts the new key's signature.
    info = _info(fleet, reg.device_credential)
    assert len(info.key_announcements) == 2
    assert agent.apply(info.key_announcements) == []
    assert set(agent.keys()) == {new_id}  # the old one retired on the agent too
    only_new = pb.UpdateInfo()
    only_new.CopyFrom(info)
    del only_new.signatures[:]
    only_new.signatures.extend(s for s in info.signatures if s.key_id == new_id)
    assert agent.check(only_new) == new_id

    # Forged and replayed statements: refused (422), nothing changes.
    stranger = Ed25519PrivateKey.generate()
    body, signature = sig.sign_key_statement(stranger, sig.raw_public_key(stranger))
    r = client.post("/api/v1/signing/statements", json={"statement": body.decode(), "signature": signature.hex()})
    assert r.status_code == 422 and "not trusted" in r.json()["detail"]
    r = client.post("/api/v1/signing/statements", json=rotation)  # signed by the now retired key
    assert r.status_code == 422
    body, signature = sig.sign_key_statement(signing.read_key_file(new_path), sig.raw_public_key(old_key))
    r = client.post("/api/v1/signing/statements", json={"statement": body.decode(), "signature": signature.hex()})
    assert r.status_code == 422 and "retired" in r.json()["detail"]
    tampered = {**retire, "signature": ("00" if retire["signature"][:2] != "00" else "11") + retire["signature"][2:]}
    assert client.post("/api/v1/signing/statements", json=tampered).status_code == 422
    assert len(_info(fleet, reg.device_credential).key_announcements) == 2
    # The server-side commands stay the local mode's.
    with pytest.raises(signing.ConflictError, match="edgeloop sign rotate"):
        signing.rotate(server_ctx.settings, server_ctx.factory, server_ctx.blobs)
