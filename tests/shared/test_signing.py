"""shared.signing: every field of a statement is covered, wrong and unknown keys and malformed
input are refused with their own error type, and key statements rotate trust only from a key
already trusted."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import signing as sig

H = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
FIELDS = {"artefact_sha256": H[0], "encoding": "diff/sparse-v1", "size": 1234,
          "target_model_hash": H[1], "base_model_hash": H[2]}


def keypair() -> tuple[Ed25519PrivateKey, bytes, str]:
    k = Ed25519PrivateKey.generate()
    pub = sig.raw_public_key(k)
    return k, pub, sig.key_id(pub)


def signed(key: Ed25519PrivateKey, **fields) -> tuple[sig.ArtefactStatement, bytes]:
    f = {**FIELDS, **fields}
    kid, s = sig.sign_artefact(key, **f)
    return sig.artefact_statement(**f, key_id=kid), s


def test_message_is_the_documented_bytes() -> None:
    st = sig.artefact_statement(**FIELDS, key_id=H[3])
    expected = (b"edgeloop/artefact-signature/v1\n" + json.dumps(
        {"artefact_sha256": H[0], "base_model_hash": H[2], "encoding": "diff/sparse-v1", "key_id": H[3],
         "size": 1234, "target_model_hash": H[1]}, separators=(",", ":"), sort_keys=True).encode())
    assert st.message() == expected
    full = sig.artefact_statement(**{**FIELDS, "base_model_hash": ""}, key_id=H[3])
    assert b'"base_model_hash":null' in full.message()  # the wire's "" is JSON null


def test_a_signature_verifies_and_every_field_is_covered() -> None:
    key, pub, kid = keypair()
    st, s = signed(key)
    trusted = {kid: pub}
    sig.verify_artefact(trusted, st, s)
    assert sig.verify_any(trusted, [(st, s)]) == kid
    tampered = {"artefact_sha256": H[3], "encoding": "model/safetensors-v1", "size": 1235,
                "target_model_hash": H[3], "base_model_hash": None}
    for field, value in tampered.items():
        with pytest.raises(sig.BadSignatureError):
            sig.verify_artefact(trusted, dataclasses.replace(st, **{field: value}), s)
    flipped = bytes([s[0] ^ 1]) + s[1:]
    with pytest.raises(sig.BadSignatureError):
        sig.verify_artefact(trusted, st, flipped)


def test_wrong_key_and_unknown_key_are_refused() -> None:
    key, pub, kid = keypair()
    other, other_pub, other_id = keypair()
    st, s = signed(other)
    with pytest.raises(sig.UnknownKeyError):
        sig.verify_artefact({kid: pub}, st, s)
    # The wrong key claiming the trusted key's id: a bad signature, not an unknown key.
    forged = dataclasses.replace(st, key_id=kid)
    with pytest.raises(sig.BadSignatureError):
        sig.verify_artefact({kid: pub}, forged, other.sign(forged.message()))
    with pytest.raises(sig.UnknownKeyError, match="not signed"):
        sig.verify_any({kid: pub}, [])
    with pytest.raises(sig.UnknownKeyError, match="untrusted keys"):
        sig.verify_any({kid: pub}, [(st, s)])
    # Several signatures: an untrusted one is skipped, a bad one by a trusted key is fatal.
    good = signed(key)
    assert sig.verify_any({kid: pub}, [(st, s), good]) == kid
    with pytest.raises(sig.BadSignatureError):
        sig.verify_any({kid: pub, other_id: other_pub}, [good, (st, b"\0" * 64)])


@pytest.mark.parametrize("field, value", [
    ("artefact_sha256", "ABC"), ("artefact_sha256", H[0].upper()), ("target_model_hash", ""),
    ("base_model_hash", "zz" * 32), ("key_id", H[0][:16]), ("encoding", ""), ("encoding", "Model/X"),
    ("encoding", "x" * 65), ("size", -1), ("size", 1 << 63), ("size", True), ("size", 1.0),
])
def test_malformed_statements_are_refused(field, value) -> None:
    f = {**FIELDS, "key_id": H[3], field: value}
    with pytest.raises(sig.MalformedStatementError):
        sig.ArtefactStatement(**f)


def test_signature_and_key_lengths() -> None:
    key, pub, kid = keypair()
    st, s = signed(key)
    with pytest.raises(sig.MalformedStatementError):
        sig.verify_artefact({kid: pub}, st, s[:63])
    with pytest.raises(sig.MalformedStatementError):
        sig.key_id(pub[:31])


def test_rotation_accepts_a_key_announced_under_a_trusted_one_only() -> None:
    a, a_pub, a_id = keypair()
    b, b_pub, b_id = keypair()
    c, c_pub, c_id = keypair()
    intruder, _, _ = keypair()
    a_to_b = sig.sign_key_statement(a, b_pub)
    b_retires_a = sig.sign_key_statement(b, b_pub, retire=[a_id])
    b_to_c = sig.sign_key_statement(b, c_pub)
    by_intruder = sig.sign_key_statement(intruder, c_pub)

    keys, refused = sig.apply_key_statements({a_id: a_pub}, [a_to_b])
    assert keys == {a_id: a_pub, b_id: b_pub} and refused == []  # both during the window
    keys, refused = sig.apply_key_statements({a_id: a_pub}, [a_to_b, b_retires_a, b_to_c])
    assert keys == {b_id: b_pub, c_id: c_pub} and refused == []
    # Replays change nothing once A is retired; a statement by an untrusted key is skipped.
    again, refused = sig.apply_key_statements(keys, [a_to_b, b_retires_a, b_to_c, by_intruder])
    assert again == keys and refused == []
    assert sig.apply_key_statements({a_id: a_pub}, [by_intruder])[0] == {a_id: a_pub}
    # A tampered statement by a trusted key is refused and said.
    body, s = a_to_b
    tampered = body.replace(b_pub.hex().encode(), c_pub.hex().encode()).replace(b_id.encode(), c_id.encode())
    keys, refused = sig.apply_key_statements({a_id: a_pub}, [(tampered, s)])
    assert keys == {a_id: a_pub} and "does not verify" in refused[0]


def test_a_retired_key_stays_retired_when_its_announcement_is_replayed() -> None:
    # R0 -> R1, R1 -> R2, R2 retires R1 (R0 still trusted). A server replaying only the
    # R0 -> R1 statement must not bring the retired (perhaps compromised) R1 back.
    r0, r0_pub, r0_id = keypair()
    r1, r1_pub, r1_id = keypair()
    r2, r2_pub, r2_id = keypair()
    history = [sig.sign_key_statement(r0, r1_pub), sig.sign_key_statement(r1, r2_pub),
               sig.sign_key_statement(r2, r2_pub, retire=[r1_id])]
    retired: set[str] = set()
    keys, _ = sig.apply_key_statements({r0_id: r0_pub}, history, retired)
    assert keys == {r0_id: r0_pub, r2_id: r2_pub} and retired == {r1_id}
    again, _ = sig.apply_key_statements(keys, history[:1], retired)
    assert again == keys


@pytest.mark.parametrize("mutate", [
    lambda o: {**o, "extra": 1},
    lambda o: {k: v for k, v in o.items() if k != "retire_key_ids"},
    lambda o: {**o, "key_id": H[0]},
    lambda o: {**o, "public_key": o["public_key"][:62]},
    lambda o: {**o, "retire_key_ids": [o["signer_key_id"]]},
    lambda o: {**o, "retire_key_ids": "x"},
])
def test_malformed_key_statements(mutate) -> None:
    a, a_pub, a_id = keypair()
    body, _ = sig.sign_key_statement(a, sig.raw_public_key(Ed25519PrivateKey.generate()))
    bad = sig.canonical_json(mutate(json.loads(body)))
    with pytest.raises(sig.MalformedStatementError):
        sig.parse_key_statement(bad)
    with pytest.raises(sig.MalformedStatementError):
        sig.parse_key_statement(json.dumps(json.loads(body), indent=1).encode())  # not canonical
    with pytest.raises(sig.MalformedStatementError):
        sig.parse_key_statement(b"\xff")


def test_a_key_statement_is_never_an_artefact_signature() -> None:
    """Domain separation: the same key signing both kinds cannot have one replayed as the other."""
    a, a_pub, a_id = keypair()
    body, s = sig.sign_key_statement(a, a_pub)
    st = sig.artefact_statement(**FIELDS, key_id=a_id)
    with pytest.raises(sig.BadSignatureError):
        sig.verify_artefact({a_id: a_pub}, st, s)
