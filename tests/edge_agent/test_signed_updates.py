"""Signed artefacts on the agent's real update path against a real gRPC server: the pinned key
vouches for what installs, a rotated key is learned from a statement signed by the old one,
and nothing signed by an untrusted key, nor a key statement by one, changes anything.
(The live-process version, with a tampered blob store: tests/e2e/test_signed_artefacts_e2e.py.)"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select

from edge_agent.trust import TrustError, TrustStore
from edge_agent.update_state import State
from server import signing
from server.db.engine import transaction
from server.db.models import Artefact, ArtefactSignatureRecord, KeyStatementRecord, ModelVersion
from shared import signing as sig
from tests.edge_agent.test_updater import (  # noqa: F401 - server_settings is a fixture
    Agent,
    _publish_next,
    _register,
    server_settings,
)


def _signers(ctx, model_hash: str) -> set[str]:
    with transaction(ctx.factory) as s:
        sha = s.get(ModelVersion, model_hash).full_artefact_sha256
        return {r.key_id for r in signing.signatures_of(s, sha)}


def test_enrollment_pins_the_server_key_and_a_pinned_agent_installs(server, server_ctx, tmp_path):
    cred, v0 = _register(server)
    [pub] = server.signing_keys
    kid = sig.key_id(pub)
    assert _signers(server_ctx, v0) == {kid}  # version 0 was signed as it was published
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        assert dev.trust.keys() == {kid: pub}
        saved = json.loads((tmp_path / "agent" / "trusted_keys.json").read_text())
        assert saved == {"version": 1, "roots": "enrollment", "keys": {kid: pub.hex()}}
        # A later Register answer never re-pins (it could come from anyone holding a token).
        assert not dev.trust.pin_at_enrollment([sig.raw_public_key(Ed25519PrivateKey.generate())])
        assert dev.update_to(v0) is State.COMMITTED
    finally:
        dev.close()


def test_an_agent_with_no_pinned_key_installs_nothing(server, server_ctx, tmp_path):
    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    dev.trust._keys = {}  # as an agent enrolled before signing existed
    try:
        assert dev.update_to(v0) is State.FAILED
        assert "signature: no signing key is pinned" in dev.machine.record.reason
        assert dev.store.current_hash() is None and dev.updater.stats.bytes_downloaded == 0
    finally:
        dev.close()


def test_rotation_then_retirement_reach_the_agent(server, server_ctx, tmp_path):
    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        [old_pub] = server.signing_keys
        old = sig.key_id(old_pub)
        assert dev.update_to(v0) is State.COMMITTED

        rot = signing.rotate(server_ctx.settings, server_ctx.factory, server_ctx.blobs)
        assert rot.old_key_id == old and rot.resigned == 1 and rot.skipped == []
        assert _signers(server_ctx, v0) == {old, rot.new_key_id}  # countersigned
        v1 = _publish_next(server_ctx, seed=11)
        assert _signers(server_ctx, v1) == {rot.new_key_id}  # the running signer re-read the key file

        # The agent trusts only the old key; the UpdateInfo's key statement teaches it the new one.
        assert set(dev.trust.keys()) == {old}
        assert dev.update_to(v1) is State.COMMITTED
        assert set(dev.trust.keys()) == {old, rot.new_key_id}
        assert set(TrustStore(tmp_path / "agent").keys()) == {old, rot.new_key_id}  # durable

        signing.retire(server_ctx.settings, server_ctx.factory, old)
        assert [sig.key_id(k) for k in server.signing_keys] == [rot.new_key_id]  # not sent at enrollment
        v2 = _publish_next(server_ctx, seed=12)
        assert dev.update_to(v2) is State.COMMITTED
        assert set(dev.trust.keys()) == {rot.new_key_id}

        # A fresh agent enrolled after the rotation pins the new key and skips the history.
        cred2, _ = _register(server)
        dev2 = Agent(server, tmp_path / "agent2", cred2)
        try:
            assert set(dev2.trust.keys()) == {rot.new_key_id}
            assert dev2.update_to(v2) is State.COMMITTED
        finally:
            dev2.close()
    finally:
        dev.close()


def test_a_key_announced_under_an_untrusted_key_is_ignored(server, server_ctx, tmp_path):
    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    trusted = dev.trust.keys()
    intruder = Ed25519PrivateKey.generate()
    ipub = sig.raw_public_key(intruder)
    v1 = _publish_next(server_ctx, seed=21)
    with transaction(server_ctx.factory) as s:
        art = s.get(ModelVersion, v1).full_artefact_sha256
        row = s.get(Artefact, art)
        body, signature = sig.sign_key_statement(intruder, ipub)  # self-announced
        s.add(KeyStatementRecord(key_id=sig.key_id(ipub), signer_key_id=sig.key_id(ipub), statement=body,
                                 signature=signature))
        # The server's signature replaced by the intruder's (a database the attacker writes).
        s.execute(delete(ArtefactSignatureRecord).where(ArtefactSignatureRecord.artefact_sha256 == art))
        kid, forged = sig.sign_artefact(intruder, artefact_sha256=art, encoding=row.encoding, size=row.size,
                                        target_model_hash=row.target_model_hash, base_model_hash=None)
        s.add(ArtefactSignatureRecord(artefact_sha256=art, key_id=kid, signature=forged))
    try:
        assert dev.update_to(v1) is State.FAILED
        reason = dev.machine.record.reason
        assert "signature" in reason and "untrusted keys" in reason, reason
        assert dev.trust.keys() == trusted and dev.store.current_hash() is None
        assert dev.updater.stats.bytes_downloaded == 0  # refused on the UpdateInfo, before any byte
    finally:
        dev.close()
    with transaction(server_ctx.factory) as s:
        assert s.scalars(select(KeyStatementRecord)).all()  # the statement was sent, and ignored


def test_pinned_keys_file_is_the_root_and_a_change_re_pins(tmp_path):
    a, b = (sig.raw_public_key(Ed25519PrivateKey.generate()) for _ in range(2))
    pins = tmp_path / "keys.txt"
    pins.write_text(f"# the fleet's signing key\n{a.hex()}\n")
    store = TrustStore(tmp_path / "agent", pinned_file=pins)
    assert set(store.keys()) == {sig.key_id(a)}
    assert not store.pin_at_enrollment([b])  # pinned: the Register answer is ignored
    pins.write_text(f"{b.hex()}\n")
    assert set(TrustStore(tmp_path / "agent", pinned_file=pins).keys()) == {sig.key_id(b)}
    pins.write_text("not a key\n")
    try:
        TrustStore(tmp_path / "agent", pinned_file=pins)
    except TrustError as exc:
        assert "line 1" in str(exc)
    else:
        raise AssertionError("a malformed pinned-keys file was accepted")
    (tmp_path / "agent" / "trusted_keys.json").write_text("{")
    try:
        TrustStore(tmp_path / "agent")
    except TrustError:
        pass
    else:
        raise AssertionError("a corrupt trust store was accepted")
