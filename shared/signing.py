"""Ed25519 signatures over artefact statements and key statements (docs/security.md#signed-artefacts).

Pure functions over bytes: no files, no network. A signature never covers the artefact bytes
themselves; it covers a small canonical *statement* naming them (SHA-256, size, encoding, the
model hashes). The agent checks the bytes against the statement (their hashes) and the
statement against a pinned key (the signature), so the check does not depend on how a model
hash is computed.

Signed message = ``domain tag`` + ``0x0A`` + ``canonical JSON`` where canonical JSON is
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` encoded as ASCII.
The domain tag keeps a signature of one kind from ever being valid as another.

A key id is the lowercase hex SHA-256 of the raw 32-byte public key (64 characters): it is a
full fingerprint, safe to pin.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ARTEFACT_DOMAIN = b"edgeloop/artefact-signature/v1"
KEY_DOMAIN = b"edgeloop/key-statement/v1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_STATEMENT_BYTES = 4096  # a key statement retiring many keys is still far below this
MAX_RETIRED = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENCODING = re.compile(r"[a-z0-9][a-z0-9./_-]{0,63}")


class SignatureError(ValueError):
    """A statement or signature cannot be accepted; the subclass says why."""


class MalformedStatementError(SignatureError):
    """Fields of the wrong type or form, non-canonical JSON, a signature of the wrong length."""


class UnknownKeyError(SignatureError):
    """Signed by a key the verifier does not trust (or no signature by a trusted key at all)."""


class BadSignatureError(SignatureError):
    """The signature does not verify under the key it names: tampered statement or wrong key."""


def canonical_json(obj: Mapping[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def key_id(public_key: bytes) -> str:
    """Hex SHA-256 of the raw public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise MalformedStatementError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hex64(value: object, field: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise MalformedStatementError(f"{field} must be 64 lowercase hex characters")
    return value


def _verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedStatementError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature as exc:
        raise BadSignatureError("the signature does not verify under the key it names") from exc


# --- artefact statements ---------------------------------------------------------------------
@dataclass(frozen=True)
class ArtefactStatement:
    """What a signature says about one artefact. ``base_model_hash`` is None except for diffs."""

    artefact_sha256: str
    encoding: str
    size: int
    target_model_hash: str
    base_model_hash: str | None
    key_id: str

    def __post_init__(self) -> None:
        _hex64(self.artefact_sha256, "artefact_sha256")
        _hex64(self.target_model_hash, "target_model_hash")
        _hex64(self.key_id, "key_id")
        if self.base_model_hash is not None:
            _hex64(self.base_model_hash, "base_model_hash")
        if not isinstance(self.encoding, str) or not _ENCODING.fullmatch(self.encoding):
            raise MalformedStatementError(f"encoding {self.encoding!r} is not a valid encoding name")
        if type(self.size) is not int or not 0 <= self.size < 1 << 63:
            raise MalformedStatementError(f"size {self.size!r} must be an integer in [0, 2^63)")

    def message(self) -> bytes:
        """The exact bytes signed."""
        return ARTEFACT_DOMAIN + b"\n" + canonical_json({
            "artefact_sha256": self.artefact_sha256, "base_model_hash": self.base_model_hash,
            "encoding": self.encoding, "key_id": self.key_id, "size": self.size,
            "target_model_hash": self.target_model_hash,
        })


def artefact_statement(*, artefact_sha256: str, encoding: str, size: int, target_model_hash: str,
                       base_model_hash: str | None, key_id: str) -> ArtefactStatement:
    """Builds (and validates) a statement; an empty ``base_model_hash`` means None, as on the wire."""
    return ArtefactStatement(artefact_sha256, encoding, size, target_model_hash, base_model_hash or None, key_id)


def sign_artefact(private_key: Ed25519PrivateKey, *, artefact_sha256: str, encoding: str, size: int,
                  target_model_hash: str, base_model_hash: str | None) -> tuple[str, bytes]:
    """``(key_id, signature)`` of the statement about this artefact by ``private_key``."""
    kid = key_id(raw_public_key(private_key))
    st = artefact_statement(artefact_sha256=artefact_sha256, encoding=encoding, size=size,
                            target_model_hash=target_model_hash, base_model_hash=base_model_hash, key_id=kid)
    return kid, private_key.sign(st.message())


def verify_artefact(trusted: Mapping[str, bytes], statement: ArtefactStatement, signature: bytes) -> None:
    """Raises UnknownKeyError, BadSignatureError or MalformedStatementError; returns if valid.
    ``trusted`` maps key id to raw public key."""
    public = trusted.get(statement.key_id)
    if public is None:
        raise UnknownKeyError(f"signed by key {statement.key_id[:16]}, which is not trusted here")
    _verify(public, signature, statement.message())


def verify_any(trusted: Mapping[str, bytes], statements: Iterable[tuple[ArtefactStatement, bytes]]) -> str:
    """Of several signatures of one artefact, those by trusted keys must all verify and there must
    be at least one (signatures by other keys are skipped: a key not yet announced here).
    Returns the key id that vouched."""
    vouched = ""
    unknown: list[str] = []
    for statement, signature in statements:
        if statement.key_id not in trusted:
            unknown.append(statement.key_id[:16])
            continue
        verify_artefact(trusted, statement, signature)
        vouched = vouched or statement.key_id
    if not vouched:
        detail = f"signed only by untrusted keys {', '.join(unknown)}" if unknown else "not signed"
        raise UnknownKeyError(f"no signature by a trusted key ({detail})")
    return vouched


# --- key statements (rotation) ---------------------------------------------------------------
@dataclass(frozen=True)
class KeyStatement:
    """``signer_key_id`` vouches for ``public_key`` and withdraws trust from ``retire_key_ids``."""

    public_key: bytes
    signer_key_id: str
    retire_key_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        key_id(self.public_key)  # checks the length
        _hex64(self.signer_key_id, "signer_key_id")
        if len(self.retire_key_ids) > MAX_RETIRED:
            raise MalformedStatementError(f"more than {MAX_RETIRED} keys retired in one statement")
        for kid in self.retire_key_ids:
            _hex64(kid, "retire_key_ids[]")
        if list(self.retire_key_ids) != sorted(set(self.retire_key_ids)):
            raise MalformedStatementError("retire_key_ids must be sorted and distinct")
        if self.signer_key_id in self.retire_key_ids or self.key_id in self.retire_key_ids:
            raise MalformedStatementError("a key statement cannot retire its signer or the key it announces")

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def body(self) -> bytes:
        """The canonical JSON carried on the wire (KeyAnnouncement.statement)."""
        return canonical_json({"key_id": self.key_id, "public_key": self.public_key.hex(),
                               "retire_key_ids": list(self.retire_key_ids),
                               "signer_key_id": self.signer_key_id})


def key_message(body: bytes) -> bytes:
    return KEY_DOMAIN + b"\n" + body


def sign_key_statement(signer: Ed25519PrivateKey, new_public_key: bytes,
                       retire: Iterable[str] = ()) -> tuple[bytes, bytes]:
    """``(statement body, signature)``: ``signer`` announces ``new_public_key`` (which may be its
    own key, to retire others)."""
    st = KeyStatement(new_public_key, key_id(raw_public_key(signer)), tuple(sorted(set(retire))))
    body = st.body()
    return body, signer.sign(key_message(body))


def parse_key_statement(body: bytes) -> KeyStatement:
    """Strict: canonical JSON with exactly the four fields, key_id matching public_key."""
    if len(body) > MAX_STATEMENT_BYTES:
        raise MalformedStatementError(f"key statement of {len(body)} bytes exceeds {MAX_STATEMENT_BYTES}")
    try:
        obj = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedStatementError(f"key statement is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"key_id", "public_key", "retire_key_ids", "signer_key_id"}:
        raise MalformedStatementError("key statement must have exactly key_id, public_key, retire_key_ids, signer_key_id")
    pub_hex, retire = obj["public_key"], obj["retire_key_ids"]
    if not isinstance(pub_hex, str) or not re.fullmatch(r"[0-9a-f]{64}", pub_hex):
        raise MalformedStatementError("public_key must be 64 lowercase hex characters (32 bytes)")
    if not isinstance(retire, list):
        raise MalformedStatementError("retire_key_ids must be a list")
    st = KeyStatement(bytes.fromhex(pub_hex), _hex64(obj["signer_key_id"], "signer_key_id"), tuple(retire))
    if obj["key_id"] != st.key_id:
        raise MalformedStatementError("key_id is not the SHA-256 of public_key")
    if st.body() != body:
        raise MalformedStatementError("key statement is not in canonical form")
    return st


def verify_key_statement(trusted: Mapping[str, bytes], body: bytes, signature: bytes) -> KeyStatement:
    """The statement, if its signer is trusted and its signature verifies; raises otherwise."""
    st = parse_key_statement(body)
    public = trusted.get(st.signer_key_id)
    if public is None:
        raise UnknownKeyError(f"key statement signed by {st.signer_key_id[:16]}, which is not trusted here")
    _verify(public, signature, key_message(body))
    return st


def apply_key_statements(trusted: Mapping[str, bytes], statements: Iterable[tuple[bytes, bytes]],
                         retired: set[str] | None = None) -> tuple[dict[str, bytes], list[str]]:
    """Walk ``(body, signature)`` pairs in order (the server sends its whole history, oldest
    first) and return the new trust set plus one line per statement refused. A statement counts
    only if it verifies under a key trusted *at that point*. Statements by keys not trusted
    here are skipped without a word (history from before this device's pin, or replays of
    retired keys); a bad signature or a malformed statement is refused and reported.

    ``retired`` (updated in place) is the set of key ids this verifier ever saw retired:
    retirement is permanent, so a replayed older statement (signed by a key still trusted)
    that announced a since-retired key cannot bring it back."""
    keys = dict(trusted)
    refused: list[str] = []
    retired = retired if retired is not None else set()
    for body, signature in statements:
        try:
            st = verify_key_statement(keys, body, signature)
        except UnknownKeyError:
            continue
        except SignatureError as exc:
            refused.append(str(exc))
            continue
        if st.key_id not in retired:
            keys[st.key_id] = st.public_key
        for kid in st.retire_key_ids:
            keys.pop(kid, None)
            retired.add(kid)
    return keys, refused


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    """An unencrypted PKCS#8 PEM Ed25519 private key (what ``edgeloop server signing`` writes)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise MalformedStatementError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise MalformedStatementError("the private key is not an Ed25519 key")
    return key


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
