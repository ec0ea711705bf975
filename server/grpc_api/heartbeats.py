"""Heartbeats without a transaction each: credentials checked from memory, reports coalesced
and written in one transaction per interval (docs/scale.md#heartbeat-batching).

Durability trade-off: a heartbeat is answered before it is stored. A crash loses at most the
last ``heartbeat_flush_s`` of heartbeat state (last seen time, reported model, metrics, state,
rollback reports, which the agent repeats in every heartbeat anyway); nothing else is
batched. ``heartbeat_flush_s = 0`` writes each heartbeat before answering it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from server.db.engine import transaction
from server.domain import devices as D

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class CachedCredential:
    device_id: str
    cert_not_after: datetime | None  # mTLS: the checked client certificate's expiry
    expires: float  # monotonic: re-checked against the database after this


class CredentialCache:
    """(credential hash, client-certificate fingerprint) -> device id, for credentials the
    database accepted. Bounded (least recently used dropped first), each entry re-checked
    after ``ttl_s`` (a revocation announced by no event still takes effect), and every entry
    of a device dropped by :meth:`drop_device` (devices_changed: revoked, restored,
    re-registered). Thread-safe: drops come from notifier threads."""

    def __init__(self, max_entries: int = 100_000, ttl_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], CachedCredential] = OrderedDict()
        self._by_device: dict[str, set[tuple[str, str]]] = {}
        self._drops = 0  # drop_device calls so far
        self._dropped_at: dict[str, int] = {}  # device -> _drops at its last drop
        self._floor = 0  # _drops when _dropped_at was last cleared
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> CachedCredential | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.expires < self._clock():
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def epoch(self) -> int:
        """Read before a database check; hand to :meth:`put` with its result."""
        with self._lock:
            return self._drops

    def put(self, key: tuple[str, str], device_id: str, cert_not_after: datetime | None, epoch: int) -> None:
        """Cache a check that began at ``epoch``, unless the device was dropped since (the
        check may have read its state from before the change)."""
        with self._lock:
            if max(self._floor, self._dropped_at.get(device_id, 0)) > epoch:
                return
            self._entries[key] = CachedCredential(device_id, cert_not_after, self._clock() + self.ttl_s)
            self._entries.move_to_end(key)
            self._by_device.setdefault(device_id, set()).add(key)
            while len(self._entries) > self.max_entries:
                old_key, old = self._entries.popitem(last=False)
                keys = self._by_device.get(old.device_id)
                if keys is not None:
                    keys.discard(old_key)
                    if not keys:
                        del self._by_device[old.device_id]

    def sync(self, current: dict[str, str | None]) -> None:
        """device id -> its credential hash in the database now (None: revoked or gone): drop
        every cached entry that no longer matches (a change no event announced)."""
        stale = []
        with self._lock:
            for device_id, credential_hash in current.items():
                if any(key[0] != credential_hash for key in self._by_device.get(device_id, ())):
                    stale.append(device_id)
        for device_id in stale:
            self.drop_device(device_id)

    def drop_all(self) -> None:
        """Forget every entry (a devices_changed without a device: the bus reconnected and
        may have missed revocations); checks in flight are not cached either."""
        with self._lock:
            self._drops += 1
            self._floor = self._drops
            self._dropped_at.clear()
            self._entries.clear()
            self._by_device.clear()

    def drop_device(self, device_id: str) -> None:
        with self._lock:
            self._drops += 1
            self._dropped_at[device_id] = self._drops
            if len(self._dropped_at) > self.max_entries:  # bounded: only checks in flight need them
                self._dropped_at.clear()
                self._floor = self._drops
            for key in self._by_device.pop(device_id, ()):
                self._entries.pop(key, None)


class HeartbeatBatcher:
    """Pending heartbeat reports (device id -> latest report), written by one flush per
    ``flush_s`` in one transaction. Runs on the agent server's event loop; ``write`` is how a
    flush reaches a database thread (BlockingPool.run)."""

    def __init__(self, factory: sessionmaker[Session], flush_s: float,
                 run_blocking: Callable[..., Awaitable[object]]) -> None:
        self.factory = factory
        self.flush_s = flush_s
        self._run = run_blocking
        self._pending: dict[str, D.HeartbeatReport] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one flush at a time (the loop's and a forced one)
        self._flushed = threading.Condition()
        self.flushes = 0  # flushes that wrote something
        self.written = 0  # heartbeats written so far
        self.last_batch = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def last_seen(self, device_id: str) -> datetime | None:
        """When the device was last heard from, counting heartbeats not written yet."""
        report = self._pending.get(device_id)
        return report.seen_at if report is not None else None

    async def record(self, device_id: str, report: D.HeartbeatReport) -> None:
        if self.flush_s <= 0:  # write-through: stored before the answer
            await self._run(self._write, {device_id: report}, shed=True)
            self._count(1)
            return
        held = self._pending.get(device_id)
        self._pending[device_id] = held.then(report) if held is not None else report

    def start(self) -> None:
        if self.flush_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="heartbeat-flush")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - kept pending, retried at the next interval
                log.exception("heartbeat flush failed; %d reports kept for the next one", len(self._pending))

    async def flush(self) -> int:
        """Write everything pending now (one transaction); returns the heartbeats written."""
        async with self._lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}
            try:
                await self._run(self._write, batch, shed=False)
            except BaseException:
                for device_id, report in batch.items():  # newer reports arrived meanwhile win
                    newer = self._pending.get(device_id)
                    self._pending[device_id] = report.then(newer) if newer is not None else report
                raise
            self._count(len(batch))
            return len(batch)

    def _write(self, batch: dict[str, D.HeartbeatReport]) -> None:
        with transaction(self.factory) as s:
            D.write_heartbeats(s, batch)

    def _count(self, n: int) -> None:
        with self._flushed:
            self.flushes += 1
            self.written += n
            self.last_batch = n
            self._flushed.notify_all()

    def wait_written(self, at_least: int, timeout: float) -> bool:
        """Block (any thread but the loop's) until ``written >= at_least``."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self.written >= at_least, timeout)

    async def stop(self) -> None:
        """Stop the timer and write what is pending (server shutdown)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        except Exception:  # noqa: BLE001
            log.exception("final heartbeat flush failed: %d reports lost", len(self._pending))
