"""The server's half of signed artefacts (docs/security.md#signed-artefacts): the Ed25519 key on
disk, a signature for every artefact as it is added, the keys and key statements agents are
sent, rotation and retirement, and signatures uploaded by an external key holder.

Where the key lives: ``signing_key_file`` or ``<data_dir>/signing/ed25519.key`` (PEM PKCS#8,
mode 0600, directory 0700), created at the first start of a server whose database trusts no
key yet. A database that already trusts keys never gets a fresh one silently: a lost key file
stops the server with an error, since agents would refuse everything it signed.

How signing reaches every artefact: :func:`install_signer` puts the signer in the session
factory's ``info``; :func:`sign_new_artefact` (called by ``server.domain.versions.add_artefact``,
the one way artefacts are added) signs in the same transaction that adds the row. Signing
covers the statement (``shared.signing``), so it never re-reads the blob; the blob store can
be tampered with afterwards and agents will notice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.db.base import utcnow
from server.db.engine import transaction
from server.db.models import Artefact, ArtefactSignatureRecord, KeyStatementRecord, SigningKey
from server.domain.errors import ConflictError, InvalidArgumentError, NotFoundError
from server.settings import ServerSettings
from server.store.blobs import BlobNotFoundError, BlobStore
from server.store.durable import fsync_dir, write_private_file
from shared import signing as sig

log = logging.getLogger(__name__)
SIGNER_INFO_KEY = "edgeloop.artefact_signer"


class SigningSetupError(RuntimeError):
    """The server cannot sign safely (missing or unknown key, loose file mode): it must not start."""


def key_path(settings: ServerSettings) -> Path:
    return settings.signing_key_file or settings.data_dir / "signing" / "ed25519.key"


def write_key_file(path: Path, key: Ed25519PrivateKey, *, replace: bool = False) -> None:
    """Mode 0600 from creation, fsynced, then linked into place (no clobbering an existing key
    unless ``replace``: two processes starting at once agree on one key), directory fsynced."""
    write_private_file(path, sig.private_key_pem(key), replace=replace)


def read_key_file(path: Path) -> Ed25519PrivateKey:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SigningSetupError(f"signing key {path} is readable by group or others "
                                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    try:
        return sig.load_private_key_pem(path.read_bytes())
    except sig.SignatureError as exc:
        raise SigningSetupError(f"signing key {path}: {exc}") from exc


class LocalSigner:
    """Signs with the key file, re-read when it changes (a rotation by the CLI reaches a running
    server and its workers without a restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._key: Ed25519PrivateKey | None = None

    def key(self) -> Ed25519PrivateKey:
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._key is None or stamp != self._stamp:
            self._key, self._stamp = read_key_file(self.path), stamp
        return self._key

    @property
    def key_id(self) -> str:
        return sig.key_id(sig.raw_public_key(self.key()))

    def sign(self, art: Artefact) -> ArtefactSignatureRecord:
        kid, signature = sig.sign_artefact(
            self.key(), artefact_sha256=art.sha256, encoding=art.encoding, size=art.size,
            target_model_hash=art.target_model_hash, base_model_hash=art.base_model_hash)
        return ArtefactSignatureRecord(artefact_sha256=art.sha256, key_id=kid, signature=signature)


def install_signer(factory: sessionmaker[Session], signer: LocalSigner | None) -> None:
    """Every session of ``factory`` signs the artefacts it adds (None: external mode, unsigned)."""
    factory.configure(info={SIGNER_INFO_KEY: signer})


def sign_new_artefact(session: Session, art: Artefact) -> None:
    """Sign ``art`` in this transaction if the session has a signer and it is not signed by that
    key yet. Without a signer the artefact stays unsigned and agents are not offered it."""
    signer = session.info.get(SIGNER_INFO_KEY)
    if signer is None:
        return
    record = signer.sign(art)
    if session.get(ArtefactSignatureRecord, (art.sha256, record.key_id)) is None:
        session.add(record)
        session.flush()


def statement(art: Artefact, key_id: str) -> sig.ArtefactStatement:
    return sig.artefact_statement(artefact_sha256=art.sha256, encoding=art.encoding, size=art.size,
                                  target_model_hash=art.target_model_hash,
                                  base_model_hash=art.base_model_hash, key_id=key_id)


# --- what agents are sent ------------------------------------------------------------------------
def trusted_public_keys(session: Session) -> list[bytes]:
    rows = session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))
                           .order_by(SigningKey.created_at, SigningKey.key_id))
    return [bytes(r.public_key) for r in rows]


def key_statements(session: Session) -> list[KeyStatementRecord]:
    return list(session.scalars(select(KeyStatementRecord).order_by(KeyStatementRecord.id)))


def signatures_of(session: Session, sha256: str) -> list[ArtefactSignatureRecord]:
    return list(session.scalars(select(ArtefactSignatureRecord)
                                .where(ArtefactSignatureRecord.artefact_sha256 == sha256)
                                .order_by(ArtefactSignatureRecord.created_at)))


# --- start-up ------------------------------------------------------------------------------------
def _trust(session: Session, public_key: bytes) -> None:
    kid = sig.key_id(public_key)
    if session.get(SigningKey, kid) is None:
        session.add(SigningKey(key_id=kid, public_key=public_key))
        session.flush()


def open_signing(settings: ServerSettings, factory: sessionmaker[Session]) -> LocalSigner | None:
    """Make sure the database trusts a key and, in local mode, that the key file holds one of
    its non-retired keys; configure ``factory`` to sign. Raises SigningSetupError."""
    for attempt in range(2):  # a concurrent first start can insert the same key first
        try:
            with transaction(factory) as s:
                signer = _open(settings, s)
            install_signer(factory, signer)
            return signer
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _open(settings: ServerSettings, s: Session) -> LocalSigner | None:
    known = {r.key_id: r for r in s.scalars(select(SigningKey))}
    if settings.signing_mode == "external":
        if not known:
            try:
                public = bytes.fromhex(settings.signing_public_key)
                sig.key_id(public)
            except (ValueError, sig.SignatureError) as exc:
                raise SigningSetupError("signing_mode=external needs signing_public_key: the key holder's "
                                        "Ed25519 public key, 64 hex characters (`edgeloop sign keygen`)") from exc
            _trust(s, public)
            log.info("external signing: trusting key %s", sig.key_id(public)[:16])
        return None
    path = key_path(settings)
    if not path.exists():
        if known:
            raise SigningSetupError(
                f"signing key {path} is missing but the database trusts keys "
                f"{', '.join(k[:16] for k in known)}: restore the key file (agents refuse artefacts "
                f"signed by any other key), or set signing_key_file")
        try:
            write_key_file(path, Ed25519PrivateKey.generate())
            log.info("created the artefact signing key %s", path)
        except FileExistsError:
            pass  # another process of this server created it first
    signer = LocalSigner(path)
    kid = signer.key_id
    row = known.get(kid)
    if row is None and known:
        raise SigningSetupError(f"signing key {path} ({kid[:16]}) is not one the database trusts; agents would "
                                f"refuse what it signs. Use `edgeloop server signing rotate` to change keys")
    if row is not None and row.retired_at is not None:
        raise SigningSetupError(f"signing key {path} ({kid[:16]}) was retired; restore the current key file")
    if row is None:
        _trust(s, sig.raw_public_key(signer.key()))
    log.info("artefacts are signed with key %s", kid[:16])
    return signer


# --- operator actions (CLI) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str
    resigned: int  # artefacts countersigned by the new key
    skipped: list[str]  # artefacts not countersigned (blob missing or changed, bad old signature)


def _countersign(s: Session, blobs: BlobStore, key: Ed25519PrivateKey, vouching: dict[str, bytes],
                 only_unsigned: bool = False) -> tuple[int, list[str]]:
    """Sign, with ``key``, artefacts whose blob still hashes to their row and which a key in
    ``vouching`` signed validly (``only_unsigned``: those with no signature at all)."""
    kid = sig.key_id(sig.raw_public_key(key))
    done, skipped = 0, []
    for art in s.scalars(select(Artefact).order_by(Artefact.created_at)):
        existing = signatures_of(s, art.sha256)
        if any(r.key_id == kid for r in existing) or (only_unsigned and existing):
            continue
        if not only_unsigned:
            try:
                sig.verify_any(vouching, [(statement(art, r.key_id), bytes(r.signature)) for r in existing])
            except sig.SignatureError as exc:
                skipped.append(f"{art.sha256[:12]}: {exc}")
                continue
        try:
            if hashlib.sha256(blobs.get(art.sha256)).hexdigest() != art.sha256:
                skipped.append(f"{art.sha256[:12]}: blob does not hash to its name")
                continue
        except BlobNotFoundError:
            skipped.append(f"{art.sha256[:12]}: blob missing")
            continue
        _, signature = sig.sign_artefact(key, artefact_sha256=art.sha256, encoding=art.encoding, size=art.size,
                                         target_model_hash=art.target_model_hash,
                                         base_model_hash=art.base_model_hash)
        s.add(ArtefactSignatureRecord(artefact_sha256=art.sha256, key_id=kid, signature=signature))
        done += 1
    s.flush()
    return done, skipped


def rotate(settings: ServerSettings, factory: sessionmaker[Session], blobs: BlobStore) -> Rotation:
    """Replace the local signing key: a new key, announced in a key statement signed by the
    current one, countersigns every artefact the current key vouches for, then takes the key
    file's place. Agents trust both until :func:`retire` withdraws the old one.

    Crash-safe: the new key is first written to ``<key>.next``; a rerun resumes with it."""
    if settings.signing_mode != "local":
        raise ConflictError("in signing_mode=external the key holder rotates: `edgeloop sign rotate`, then "
                            "POST /api/v1/signing/statements (docs/security.md)")
    path = key_path(settings)
    old = read_key_file(path)
    nxt_path = path.with_name(path.name + ".next")
    if nxt_path.exists():
        new = read_key_file(nxt_path)
    else:
        new = Ed25519PrivateKey.generate()
        write_key_file(nxt_path, new)
    old_pub, new_pub = sig.raw_public_key(old), sig.raw_public_key(new)
    old_id, new_id = sig.key_id(old_pub), sig.key_id(new_pub)
    with transaction(factory) as s:
        row = s.get(SigningKey, old_id)
        if row is None or row.retired_at is not None:
            raise ConflictError(f"the current key {old_id[:16]} is not trusted by the database")
        resigned, skipped = 0, []
        if s.get(SigningKey, new_id) is None:
            _trust(s, new_pub)
            body, signature = sig.sign_key_statement(old, new_pub)
            s.add(KeyStatementRecord(key_id=new_id, signer_key_id=old_id, statement=body, signature=signature))
        resigned, skipped = _countersign(s, blobs, new, {old_id: old_pub})
    os.replace(nxt_path, path)  # signers re-read it at their next artefact
    fsync_dir(path.parent)
    log.info("signing key rotated %s -> %s (%d artefacts countersigned)", old_id[:16], new_id[:16], resigned)
    return Rotation(old_id, new_id, resigned, skipped)


def retire(settings: ServerSettings, factory: sessionmaker[Session], key_id: str) -> None:
    """Withdraw trust from ``key_id``: a statement by the current key retiring it; the key is
    no longer sent at enrollment, and agents that process the statement drop it."""
    if settings.signing_mode != "local":
        raise ConflictError("in signing_mode=external the key holder retires keys: `edgeloop sign retire`, "
                            "then POST /api/v1/signing/statements (docs/security.md)")
    current = read_key_file(key_path(settings))
    cur_pub = sig.raw_public_key(current)
    if sig.key_id(cur_pub) == key_id:
        raise InvalidArgumentError("the current signing key cannot retire itself; rotate first")
    with transaction(factory) as s:
        row = s.get(SigningKey, key_id)
        if row is None:
            raise NotFoundError(f"signing key {key_id[:16]} not found")
        if row.retired_at is not None:
            return
        body, signature = sig.sign_key_statement(current, cur_pub, retire=[key_id])
        s.add(KeyStatementRecord(key_id=sig.key_id(cur_pub), signer_key_id=sig.key_id(cur_pub),
                                 statement=body, signature=signature))
        row.retired_at = utcnow()


def backfill(settings: ServerSettings, factory: sessionmaker[Session], blobs: BlobStore) -> tuple[int, list[str]]:
    """Sign artefacts that have no signature at all (published before signing existed), after
    re-hashing each blob. Their statements come from the database rows: run it only on a
    database you trust (right after the upgrade to migration 0006)."""
    if settings.signing_mode != "local":
        raise ConflictError("backfill signs with the local key; in external mode the key holder signs")
    key = read_key_file(key_path(settings))
    with transaction(factory) as s:
        return _countersign(s, blobs, key, {}, only_unsigned=True)


def add_signature(session: Session, sha256: str, key_id: str, signature: bytes) -> ArtefactSignatureRecord:
    """An uploaded signature (external key holder): stored only if it verifies, under a
    trusted key, over the statement this server would send for the artefact."""
    art = session.get(Artefact, sha256)
    if art is None:
        raise NotFoundError(f"artefact {sha256[:16]} not found")
    key = session.get(SigningKey, key_id)
    if key is None or key.retired_at is not None:
        raise InvalidArgumentError(f"key {key_id[:16]} is not a trusted signing key")
    try:
        sig.verify_artefact({key_id: bytes(key.public_key)}, statement(art, key_id), signature)
    except sig.SignatureError as exc:
        raise InvalidArgumentError(f"signature refused: {exc}") from exc
    row = session.get(ArtefactSignatureRecord, (sha256, key_id))
    if row is None:
        row = ArtefactSignatureRecord(artefact_sha256=sha256, key_id=key_id, signature=signature)
        session.add(row)
        session.flush()
    return row


def unsigned_statements(session: Session, key_id: str | None = None) -> list[dict]:
    """What an external key holder signs: artefacts not signed by any trusted key yet (or, with
    ``key_id``, not by that key: what to countersign after a rotation), as statement fields
    (the key id is the signer's to fill in)."""
    if key_id is not None:
        trusted = {key_id}
    else:
        trusted = {r.key_id for r in session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None)))}
    signed = {r.artefact_sha256 for r in session.scalars(select(ArtefactSignatureRecord))
              if r.key_id in trusted}
    return [{"artefact_sha256": a.sha256, "encoding": a.encoding, "size": a.size,
             "target_model_hash": a.target_model_hash, "base_model_hash": a.base_model_hash}
            for a in session.scalars(select(Artefact).order_by(Artefact.created_at)) if a.sha256 not in signed]


def add_key_statement(settings: ServerSettings, session: Session, body: bytes, signature: bytes) -> KeyStatementRecord:
    """A key statement uploaded by the external key holder (``edgeloop sign rotate|retire``):
    it announces a key (rotation: the new key, signed by a trusted one) and may retire others.
    Stored and applied (the announced key trusted, the retired ones retired) only if it verifies
    under a trusted, non-retired key; agents get it with every GetUpdate, like a local rotation's.
    Idempotent. Retirement is permanent: a statement announcing a retired key is refused."""
    if settings.signing_mode != "external":
        raise ConflictError("key statements are uploaded in signing_mode=external; in local mode use "
                            "`edgeloop server signing rotate|retire`")
    rows = {r.key_id: r for r in session.scalars(select(SigningKey))}
    trusted = {kid: bytes(r.public_key) for kid, r in rows.items() if r.retired_at is None}
    try:
        st = sig.verify_key_statement(trusted, body, signature)
    except sig.SignatureError as exc:
        raise InvalidArgumentError(f"key statement refused: {exc}") from exc
    existing = session.scalars(select(KeyStatementRecord).where(KeyStatementRecord.statement == body)).first()
    if existing is not None:
        return existing
    announced = rows.get(st.key_id)
    if announced is not None and announced.retired_at is not None:
        raise InvalidArgumentError(f"key {st.key_id[:16]} was retired; retirement is permanent")
    for kid in st.retire_key_ids:
        if kid not in rows:
            raise InvalidArgumentError(f"cannot retire {kid[:16]}: not a key of this server")
    _trust(session, st.public_key)
    now = utcnow()
    for kid in st.retire_key_ids:
        if rows[kid].retired_at is None:
            rows[kid].retired_at = now
    row = KeyStatementRecord(key_id=st.key_id, signer_key_id=st.signer_key_id, statement=body, signature=signature)
    session.add(row)
    session.flush()
    log.info("external signing: key statement by %s stored (announces %s, retires %s)", st.signer_key_id[:16],
             st.key_id[:16], ", ".join(k[:16] for k in st.retire_key_ids) or "none")
    return row
