"""Content-addressed blob store on disk: ``<root>/<aa>/<sha256>``, written atomically.

A blob is written to a temp file in the same directory, fsynced, renamed onto its final name
and the directory fsynced, so a crash leaves either no blob or the complete blob, never a
torn one. Writing a blob that already exists is a no-op (pushes are idempotent).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from server.store.durable import fsync_dir

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")  # \Z: "$" would also accept a trailing newline


class BlobNotFoundError(KeyError):
    pass


class BlobStore:
    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def path(self, sha256: str) -> Path:
        if not _HEX64.match(sha256):
            raise ValueError(f"not a hex SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, expected_sha256: str | None = None) -> str:
        """Store ``data``; returns its SHA-256. Refuses data that does not match ``expected_sha256``."""
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise ValueError(f"blob content hashes to {digest}, expected {expected_sha256}")
        final = self.path(digest)
        if final.is_file() and final.stat().st_size == len(data):
            return digest
        new_shard = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(final.parent)
            if new_shard:  # the shard's own entry in root, or a power cut can drop the shard
                fsync_dir(self.root)
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFoundError(sha256) from exc

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        try:
            with self.path(sha256).open("rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError as exc:
            raise BlobNotFoundError(sha256) from exc

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFoundError(sha256) from exc

    def delete(self, sha256: str) -> bool:
        """Remove a blob; False if it was not there. Callers delete only after the database
        row that referenced it is gone and committed, so a crash leaves at worst an orphan."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_hashes(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if _HEX64.match(f.name):
                        yield f.name

