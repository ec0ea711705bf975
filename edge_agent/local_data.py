"""The device's own labelled inputs, kept on disk and never uploaded by this module.

Two consumers read it: update probation scores a freshly installed model on the newest
entries against the model it replaced, and the local learner (re-)derives the personal model
from it whenever the fleet base changes. Entries are encoded samples (``shared.samples``) in a
SQLite file (WAL, ``synchronous=FULL``), bounded by count: past ``max_items`` the oldest go,
since fresh data describes the device's world best. A corrupt file is moved aside as
``<name>.corrupt-<unix time>`` and the store starts empty, as the upload queue does.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from shared.samples import SampleFormatError, decode_sample, encode_sample

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labelled (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    label INTEGER NOT NULL,
    added_at REAL NOT NULL
);
"""


class LocalDataset:
    """Bounded, durable FIFO of ``(input, label)``; thread-safe (one connection, one lock)."""

    def __init__(self, path: Path, max_items: int = 2048) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.path = Path(path)
        self.max_items = int(max_items)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open_or_recover()
        self._added = 0  # entries added since this process started (a learner's trigger)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        conn.execute("SELECT COUNT(*) FROM labelled").fetchone()
        return conn

    def _open_or_recover(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("local data %s is unreadable (%s); moved aside to %s", self.path, exc, aside)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            return self._open()

    def add(self, x: np.ndarray, label: int) -> None:
        """Store one labelled input durably; drops the oldest entries past ``max_items``."""
        self.add_many([(x, label)])

    def add_many(self, items: list[tuple[np.ndarray, int]]) -> None:
        """Store labelled inputs in one transaction (one fsync per inference batch, not per
        input: SD cards are slow to sync); drops the oldest entries past ``max_items``."""
        if not items:
            return
        rows = [(encode_sample(np.asarray(x)), int(label), time.time()) for x, label in items]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO labelled (payload, label, added_at) VALUES (?, ?, ?)", rows)
                self._conn.execute(
                    "DELETE FROM labelled WHERE seq <= (SELECT MAX(seq) FROM labelled) - ?",
                    (self.max_items,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._added += len(rows)

    @property
    def added(self) -> int:
        """Entries added by this process (monotonic; learners compare it with a mark)."""
        return self._added

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM labelled").fetchone()[0])

    def recent(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``n`` entries (all with None), oldest first, as ``(x, y)`` arrays.

        Entries that no longer decode (a torn page on the SD card) are skipped, not fatal.
        ``x`` is empty with shape ``(0,)`` when nothing is stored."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload, label FROM labelled ORDER BY seq DESC LIMIT ?",
                (-1 if n is None else int(n),)).fetchall()
        xs, ys = [], []
        for payload, label in reversed(rows):
            try:
                xs.append(decode_sample(payload))
            except SampleFormatError:
                log.warning("skipping an unreadable local sample")
                continue
            ys.append(int(label))
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:  # the model's input shape changed: keep the newest shape only
            newest = xs[-1].shape
            keep = [i for i, x in enumerate(xs) if x.shape == newest]
            xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
        if not xs:
            return np.zeros((0,), dtype=np.uint8), np.zeros((0,), dtype=np.int64)
        return np.stack(xs), np.asarray(ys, dtype=np.int64)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
