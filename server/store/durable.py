"""Durability helpers for the server's own files (blobs, TLS keys, signing keys, tokens)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new entry in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> None:
    """The one writer of the server's secret (and TLS) files: ``data`` goes to a fresh temp file
    next to ``path``, created ``O_CREAT|O_EXCL|O_NOFOLLOW`` with ``mode`` (so a key is never
    readable by others, not even for an instant, and a stale or planted temp file is never
    reused), fsynced, then renamed over ``path`` (``replace``) or hard-linked to it without
    clobbering (``replace=False``: raises FileExistsError when ``path`` exists, so two processes
    creating a key at once agree on one), and the directory fsynced. A crash leaves the old
    file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # O_CREAT's mode is filtered by the umask; set it exactly
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # FileExistsError if another process won
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
