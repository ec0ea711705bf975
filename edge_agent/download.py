"""Resumable, verified artefact downloads.

A device on a flaky link may need many connections to fetch one artefact, and may reboot in
between, so received bytes go straight to ``<directory>/<sha256>.part`` (append, flush,
fsync per write) and a restart resumes from the part file's size after re-hashing it. The
bytes only become ``<sha256>.artefact`` (an atomic rename, then a directory fsync) once their
size and SHA-256 match what the server announced: nothing unverified is ever installed.
Hashing as the bytes arrive keeps the check free at the end (as Mender's SHA reader does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download cannot proceed as asked (bad parameters, writing past the end, incomplete)."""


class DownloadIntegrityError(DownloadError):
    """The downloaded bytes do not match the announced size or SHA-256; they were discarded."""


def _check_sha256(value: str) -> str:
    # The digest names files on disk: only accept exactly 64 lowercase hex digits, so a
    # hostile value cannot point outside the directory.
    if not isinstance(value, str) or not _SHA256_HEX.match(value):
        raise DownloadError(f"artefact sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never half.

    Temp file in the same directory (rename is only atomic within a file system), fsync it,
    ``os.replace``, then fsync the directory so the rename itself survives power loss.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temp_files(directory: Path, name: str = "") -> list[str]:
    """Delete what :func:`atomic_write` leaves when killed between write and rename
    (``<name>.tmp-<pid>``; every name when ``name`` is empty). Only safe while no writer in
    this process targets the directory (start-up, or under the writer's lock)."""
    removed = []
    for tmp in Path(directory).glob(f"{name or '*'}.tmp-*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _hash_file(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h


class PartialDownload:
    """The on-disk state of one artefact download; resumes from an existing part file."""

    def __init__(
        self, directory: Path, artefact_sha256: str, expected_size: int, max_size: int
    ) -> None:
        self.artefact_sha256 = _check_sha256(artefact_sha256)
        if max_size < 0:
            raise DownloadError(f"max_size must be >= 0, got {max_size}")
        if not 0 <= expected_size <= max_size:
            raise DownloadError(
                f"expected_size {expected_size} is outside [0, max_size={max_size}]"
            )
        self.directory = Path(directory)
        self.expected_size = int(expected_size)
        self.max_size = int(max_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.part_path = self.directory / f"{self.artefact_sha256}.part"
        self.final_path = self.directory / f"{self.artefact_sha256}.artefact"
        self._hash = hashlib.sha256()
        self._offset = 0
        self._file = None
        if self.part_path.exists():
            size = self.part_path.stat().st_size
            if size > self.expected_size:
                logger.warning(
                    "part file %s has %d bytes, more than the expected %d; starting over",
                    self.part_path,
                    size,
                    self.expected_size,
                )
                self.part_path.unlink()
            else:
                self._hash = _hash_file(self.part_path)
                self._offset = size
                if size:
                    logger.info(
                        "resuming download of %s at byte %d", self.artefact_sha256[:16], size
                    )

    @property
    def offset(self) -> int:
        """Bytes received so far: ask the server for the range starting here."""
        return self._offset

    @property
    def complete(self) -> bool:
        return self._offset == self.expected_size

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` durably. Refuses bytes past ``expected_size``.

        Each call ends in an fsync, so pass chunks of a useful size (hundreds of KiB): an
        fsync per tiny chunk wears an SD card and is slow.
        """
        if not chunk:
            return
        if self._offset + len(chunk) > self.expected_size:
            raise DownloadError(
                f"writing {len(chunk)} bytes at offset {self._offset} would pass the expected "
                f"size {self.expected_size} of artefact {self.artefact_sha256[:16]}"
            )
        if self._file is None:
            self._file = open(self.part_path, "ab")
        try:
            self._file.write(chunk)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            # A partial write (disk full) must not leave bytes the running hash has not
            # seen: cut the file back to the last good offset.
            self._close_file()
            try:
                os.truncate(self.part_path, self._offset)
            except OSError:
                self.part_path.unlink(missing_ok=True)
                self._hash, self._offset = hashlib.sha256(), 0
            raise
        self._hash.update(chunk)
        self._offset += len(chunk)

    def finalize(self) -> Path:
        """Verify size and SHA-256, then atomically publish ``<sha256>.artefact``.

        An incomplete download raises :class:`DownloadError` and keeps the part file (it can
        still resume); a complete one that does not match raises
        :class:`DownloadIntegrityError` and deletes it (resuming would reproduce the error).
        """
        self._close_file()
        if self._offset < self.expected_size:
            raise DownloadError(
                f"download of {self.artefact_sha256[:16]} is incomplete: "
                f"{self._offset} of {self.expected_size} bytes"
            )
        actual = self._hash.hexdigest()
        if actual != self.artefact_sha256:
            self.discard()
            raise DownloadIntegrityError(
                f"downloaded artefact hashes to {actual[:16]}, expected {self.artefact_sha256[:16]}; "
                "discarded"
            )
        if not self.part_path.exists():  # an empty artefact never opened its part file
            self.part_path.touch()
        with open(self.part_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.part_path, self.final_path)
        fsync_dir(self.directory)
        return self.final_path

    def discard(self) -> None:
        """Delete the part file and start again from byte 0."""
        self._close_file()
        self.part_path.unlink(missing_ok=True)
        self._hash, self._offset = hashlib.sha256(), 0

    def close(self) -> None:
        """Release the file handle; the part file stays for a later resume."""
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> PartialDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
