"""A bounded, crash-safe queue of samples waiting to be uploaded.

The device is offline for hours at a time and loses power without warning, so samples live
in a SQLite file (stdlib ``sqlite3``, WAL journal, ``synchronous=FULL``): once :meth:`put`
returns, the sample survives a crash. Storage on an SD card is small, so the queue is bounded
by item count and payload bytes; past the bound it drops the oldest samples (fresh data is
worth more to retraining) or refuses new ones, and counts what it dropped.

Delivery is at-least-once: :meth:`peek_batch` does not remove anything, only :meth:`ack`
does, after the server confirmed. Samples are keyed by content (:func:`shared.samples.
sample_id`), so a re-sent sample is recognised here and by the server.

A corrupt or unreadable database must never stop the agent: it is moved aside as
``<name>.corrupt-<unix time>`` and the queue starts empty, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ON_FULL = ("drop_oldest", "drop_new")
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    label INTEGER,
    metadata TEXT NOT NULL,
    captured_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _rollback(conn: sqlite3.Connection) -> None:
    # On a corrupt file ROLLBACK itself can fail; the original error is the one to report.
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


@dataclass(frozen=True)
class QueuedSample:
    """One sample: ``sample_id`` is the hex SHA-256 of ``payload`` (an encoded sample)."""

    sample_id: str
    payload: bytes
    label: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    captured_at: float = 0.0

    @classmethod
    def from_payload(
        cls,
        payload: bytes,
        *,
        label: int | None = None,
        metadata: dict[str, str] | None = None,
        captured_at: float | None = None,
    ) -> QueuedSample:
        """Build a sample with its content id computed (``captured_at`` defaults to now)."""
        return cls(
            sample_id=hashlib.sha256(payload).hexdigest(),
            payload=bytes(payload),
            label=label,
            metadata=dict(metadata or {}),
            captured_at=time.time() if captured_at is None else float(captured_at),
        )


class UploadQueue:
    """Persistent FIFO of :class:`QueuedSample`; one connection, guarded by a lock.

    Thread-safe: the capture thread puts while the upload thread peeks and acks.
    """

    def __init__(
        self,
        path: Path,
        max_items: int = 10000,
        max_bytes: int = 64 * 1024 * 1024,
        on_full: str = "drop_oldest",
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        self.path = Path(path)
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self.on_full = on_full
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self._bytes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_or_recover()

    # -- opening and recovery -------------------------------------------------------------

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "PRAGMA synchronous=FULL"
            )  # WAL + FULL: a committed put survives power loss
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check failed: {check}")
            conn.executescript(_SCHEMA)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"unknown queue schema version {version}")
            count, total = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn, self._count, self._bytes = conn, int(count), int(total)

    def _open_or_recover(self) -> None:
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # includes "file is not a database", "malformed"
            self._move_aside(exc)
            self._open()

    def _move_aside(self, exc: Exception) -> None:
        """Rename the database (and its WAL/SHM side files) so a fresh one can start."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        suffix = f".corrupt-{int(time.time())}"
        n = 0
        while Path(f"{self.path}{suffix}").exists():  # twice in one second: keep both copies
            n += 1
            suffix = f".corrupt-{int(time.time())}-{n}"
        for side in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{side}")
            if src.exists():
                os.replace(src, Path(f"{self.path}{suffix}{side}"))
        logger.warning(
            "upload queue %s is corrupt or unreadable (%s); moved aside as *%s, starting empty",
            self.path,
            exc,
            suffix,
        )

    def _run(self, op):
        """Run ``op(conn)`` under the lock; on corruption found mid-flight, recover and retry once.

        Only corruption is handled here (its contents are lost anyway); other errors, such
        as a full disk, propagate so the caller can decide.
        """
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"upload queue {self.path} is closed")
            try:
                return op(self._conn)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                self._move_aside(exc)
                self._open()
                return op(self._conn)

    # -- queue operations -------------------------------------------------------------------

    def put(self, sample: QueuedSample) -> bool:
        """Persist ``sample``. False if already queued, dropped because the queue is full, or
        not storable right now (disk full, database locked: logged)."""
        if hashlib.sha256(sample.payload).hexdigest() != sample.sample_id:
            raise ValueError(
                f"sample_id {sample.sample_id[:16]}... is not the SHA-256 of its payload"
            )
        try:  # numpy integers are fine; floats and strings are a caller's bug
            label = None if sample.label is None else operator.index(sample.label)
        except TypeError:
            raise ValueError(f"label must be an integer or None, got {sample.label!r}") from None
        metadata = json.dumps({str(k): str(v) for k, v in sample.metadata.items()}, sort_keys=True)
        size = len(sample.payload)
        try:
            return self._run(lambda conn: self._put(conn, sample, label, metadata, size))
        except sqlite3.OperationalError as exc:
            # Disk full or locked: losing one sample beats stopping capture and inference.
            logger.warning("could not queue sample %s: %s", sample.sample_id[:16], exc)
            return False

    def _put(
        self,
        conn: sqlite3.Connection,
        sample: QueuedSample,
        label: int | None,
        metadata: str,
        size: int,
    ) -> bool:
        if conn.execute(
            "SELECT 1 FROM samples WHERE sample_id = ?", (sample.sample_id,)
        ).fetchone():
            return False
        fits = size <= self.max_bytes
        evict: list[tuple[int, int]] = []
        if fits and self.on_full == "drop_oldest":
            count, total = self._count, self._bytes
            for seq, old_size in conn.execute("SELECT seq, size FROM samples ORDER BY seq"):
                if count + 1 <= self.max_items and total + size <= self.max_bytes:
                    break
                evict.append((seq, old_size))
                count, total = count - 1, total - old_size
        elif fits:
            fits = self._count + 1 <= self.max_items and self._bytes + size <= self.max_bytes
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not fits:
                self._bump_dropped(conn, 1)
            else:
                if evict:
                    conn.executemany("DELETE FROM samples WHERE seq = ?", [(s,) for s, _ in evict])
                    self._bump_dropped(conn, len(evict))
                conn.execute(
                    "INSERT INTO samples (sample_id, payload, size, label, metadata, captured_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        sample.sample_id,
                        sample.payload,
                        size,
                        label,
                        metadata,
                        sample.captured_at,
                    ),
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if not fits:
            logger.debug("upload queue full: dropped new sample %s", sample.sample_id[:16])
            return False
        if evict:
            logger.debug("upload queue full: dropped %d oldest samples", len(evict))
        self._count += 1 - len(evict)
        self._bytes += size - sum(s for _, s in evict)
        return True

    @staticmethod
    def _bump_dropped(conn: sqlite3.Connection, n: int) -> None:
        # No UPSERT / RETURNING anywhere: Ubuntu 18.04 (Jetson Nano's JetPack 4) ships
        # SQLite 3.22, older than both.
        conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0)")
        conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (n,))

    def peek_batch(self, max_items: int, max_bytes: int) -> list[QueuedSample]:
        """The oldest samples, without removing them, up to ``max_items`` and ``max_bytes``.

        The first sample is returned even when it alone exceeds ``max_bytes``: otherwise one
        large sample at the head would block the queue forever.
        """
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"max_items and max_bytes must be >= 1, got {max_items}, {max_bytes}")

        def op(conn: sqlite3.Connection) -> list[QueuedSample]:
            out: list[QueuedSample] = []
            total = 0
            rows = conn.execute(
                "SELECT sample_id, payload, size, label, metadata, captured_at FROM samples"
                " ORDER BY seq LIMIT ?",
                (max_items,),
            )
            for sid, payload, size, label, metadata, captured_at in rows:
                if out and total + size > max_bytes:
                    break
                out.append(
                    QueuedSample(sid, bytes(payload), label, json.loads(metadata), captured_at)
                )
                total += size
            return out

        return self._run(op)

    def ack(self, sample_ids: Iterable[str]) -> int:
        """Remove delivered samples; unknown ids are ignored. Returns how many were removed."""
        ids = list(dict.fromkeys(sample_ids))

        def op(conn: sqlite3.Connection) -> int:
            removed_n = removed_bytes = 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sid in ids:
                    row = conn.execute(
                        "SELECT size FROM samples WHERE sample_id = ?", (sid,)
                    ).fetchone()
                    if row is not None:
                        conn.execute("DELETE FROM samples WHERE sample_id = ?", (sid,))
                        removed_n += 1
                        removed_bytes += row[0]
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._count -= removed_n
            self._bytes -= removed_bytes
            return removed_n

        return self._run(op) if ids else 0

    # -- introspection ----------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def total_bytes(self) -> int:
        """Payload bytes queued (excluding SQLite's own overhead)."""
        with self._lock:
            return self._bytes

    @property
    def dropped(self) -> int:
        """Samples dropped because of the bound, over the life of this database file."""

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
            return int(row[0]) if row else 0

        return self._run(op)

    def close(self) -> None:
        """Close the connection (checkpoints the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> UploadQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
