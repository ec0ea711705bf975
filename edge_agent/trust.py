"""The artefact-signing keys this agent trusts (docs/security.md#signed-artefacts).

Kept in ``<data_dir>/trusted_keys.json``, replaced durably (temp, fsync, rename, directory
fsync: ``edge_agent.download.atomic_write``)::

    {"version": 1, "roots": "<where the first keys came from>", "keys": {"<key id>": "<public key hex>"},
     "retired": ["<key id>", ...]}

``retired`` lists every key id a trusted statement ever retired: retirement is permanent, so
replaying the older statement that once announced such a key does not bring it back.

How keys get here:

- **pinned**: ``trusted_keys_file`` (setting) lists public keys, hex, one per line (``#``
  comments). Its keys are the roots; when the file's key set changes, the trust set is
  reset to it (the operator's way to re-pin after a key loss or compromise).
- **enrollment**: without that file, the keys of the Register answer are pinned when the
  agent enrols (trust on first use, over the TLS channel whose CA the agent pins), and only
  then: later answers never change them.
- **rotation**: a key statement signed by a key trusted here adds a key and may retire
  others (:func:`shared.signing.apply_key_statements`).

With no key at all the agent installs nothing: every artefact is refused as signed by an
untrusted key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from edge_agent.download import atomic_write
from protos.edgeloop.v1 import fleet_pb2 as pb
from shared import signing as sig

log = logging.getLogger(__name__)
FILE_NAME = "trusted_keys.json"


class TrustError(ValueError):
    """The trust store or the pinned-keys file cannot be read: the agent must not guess."""


def read_pinned_file(path: Path) -> list[bytes]:
    """Public keys, hex (64 characters), one per line; blank lines and ``#`` comments skipped."""
    keys = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise TrustError(f"trusted_keys_file {path}: {exc}") from exc
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            raw = bytes.fromhex(line)
            sig.key_id(raw)
        except (ValueError, sig.SignatureError) as exc:
            raise TrustError(f"trusted_keys_file {path} line {n}: not a 64-hex Ed25519 public key") from exc
        keys.append(raw)
    if not keys:
        raise TrustError(f"trusted_keys_file {path} lists no key")
    return keys


class TrustStore:
    """Thread-safe; every change is on disk before the method returns."""

    def __init__(self, data_dir: Path, *, pinned_file: Path | None = None) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._retired: set[str] = set()
        self._roots, self._keys = self._load()
        if pinned_file is not None:
            self._pin_file(read_pinned_file(pinned_file), pinned_file)

    # --- persistence ----------------------------------------------------------------------
    def _load(self) -> tuple[str, dict[str, bytes]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "", {}
        except ValueError as exc:
            raise TrustError(f"{self.path} is not JSON: {exc}") from exc
        try:
            keys = {}
            for kid, hexkey in data["keys"].items():
                raw = bytes.fromhex(hexkey)
                if sig.key_id(raw) != kid:
                    raise TrustError(f"{self.path}: key id {kid[:16]} does not match its key")
                keys[kid] = raw
            retired = data.get("retired", [])
            if not isinstance(retired, list) or not all(isinstance(k, str) for k in retired):
                raise TrustError(f"{self.path}: 'retired' must be a list of key ids")
            self._retired = set(retired)
            return str(data["roots"]), keys
        except (KeyError, TypeError, AttributeError, ValueError, sig.SignatureError) as exc:
            if isinstance(exc, TrustError):
                raise
            raise TrustError(f"{self.path} is malformed: {exc}") from exc

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, object] = {"version": 1, "roots": self._roots,
                                   "keys": {k: v.hex() for k, v in sorted(self._keys.items())}}
        if self._retired:  # only once a key was retired: the file's older form stays as it was
            data["retired"] = sorted(self._retired)
        atomic_write(self.path, json.dumps(data, indent=1).encode())

    # --- reading --------------------------------------------------------------------------
    def keys(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._keys)

    @property
    def pinned(self) -> bool:
        return bool(self._keys)

    # --- pinning --------------------------------------------------------------------------
    def _pin_file(self, keys: list[bytes], path: Path) -> None:
        roots = "file:" + hashlib.sha256(b"".join(sorted(keys))).hexdigest()[:16]
        with self._lock:
            if self._roots == roots:
                return  # same pins as last start: keep what rotation added
            self._roots, self._keys = roots, {sig.key_id(k): k for k in keys}
            self._retired -= set(self._keys)  # the operator re-pinned these explicitly
            self._save()
        log.warning("pinned %d artefact-signing keys from %s", len(keys), path)

    def pin_at_enrollment(self, public_keys: Iterable[bytes]) -> bool:
        """Pin the Register answer's keys if nothing is pinned yet; True if it did."""
        keys = {}
        for raw in public_keys:
            try:
                keys[sig.key_id(raw)] = bytes(raw)
            except sig.SignatureError:
                log.warning("ignoring a malformed signing key in the Register answer")
        with self._lock:
            if self._keys or not keys:
                if not self._keys:
                    log.error("the server sent no signing key at enrollment: no update can be installed")
                return False
            self._roots, self._keys = "enrollment", keys
            self._save()
        log.info("pinned artefact-signing keys %s at enrollment", ", ".join(k[:16] for k in keys))
        return True

    # --- rotation -------------------------------------------------------------------------
    def apply(self, announcements: Iterable[pb.KeyAnnouncement]) -> list[str]:
        """Walk the server's key statements; persist the new trust set if it changed. Returns
        why statements by trusted keys were refused (those are worth an operator's look)."""
        pairs = [(bytes(a.statement), bytes(a.signature)) for a in announcements]
        if not pairs:
            return []
        with self._lock:
            retired = set(self._retired)
            new, refused = sig.apply_key_statements(self._keys, pairs, retired)
            if new != self._keys or retired != self._retired:
                added = sorted(set(new) - set(self._keys))
                dropped = sorted(set(self._keys) - set(new))
                self._keys, self._retired = new, retired
                self._save()
                if added or dropped:
                    log.warning("signing keys rotated: trusting %s, retired %s",
                                [k[:16] for k in added], [k[:16] for k in dropped])
        for why in refused:
            log.error("key statement refused: %s", why)
        return refused

    # --- artefacts ------------------------------------------------------------------------
    def check(self, info: pb.UpdateInfo) -> str:
        """The key id that vouches for this artefact's statement (as the UpdateInfo states it);
        raises shared.signing.SignatureError. The caller checks the bytes against the same
        fields (size, SHA-256, encoding, model hashes)."""
        keys = self.keys()
        if not keys:
            raise sig.UnknownKeyError("no signing key is pinned on this agent (trusted_keys_file, or enrol again)")
        statements = [(sig.artefact_statement(
            artefact_sha256=info.artefact_sha256, encoding=info.encoding, size=info.artefact_size,
            target_model_hash=info.target_model_hash, base_model_hash=info.base_model_hash or None,
            key_id=s.key_id), bytes(s.signature)) for s in info.signatures]
        return sig.verify_any(keys, statements)
