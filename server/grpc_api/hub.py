"""The open WatchUpdates streams and every known device's current target, kept on the agent
server's event loop, so that a publish costs one batched read and a push per stream that
needs it: O(N) in total, not one transaction and one wake-up per stream.

- ``targets_changed`` (any thread, also from other processes through the event bus) marks
  devices dirty: the payload's ``device_ids``, or every known device when it names none.
  One refresh reads the dirty devices' targets (and the round of each new target version)
  in a few chunked ``IN`` queries, then pushes to each stream whose last sent target differs.
  Events that arrive during a refresh are coalesced into the next one.
- ``devices_changed`` (revoked, restored, re-registered) re-reads that device: a revoked one's
  streams end with UNAUTHENTICATED.
- Every ``resync_s`` all known devices are re-read the same way (one batched read for all of
  them, not a poll per stream), so an event lost between processes still converges: targets,
  revocations, and credentials replaced behind the server's back (``on_credentials``).
- Keepalives are per-stream timers on the loop; a stream that ends just removes itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Device, ModelVersion
from server.notifier import Notifier, Payload

log = logging.getLogger(__name__)
CHUNK = 500  # ids per IN list: well under SQLite's and PostgreSQL's bound-parameter limits
MAX_VERSIONS = 1024
SETTLE_WAIT_S = 2.0  # how long a heartbeat waits for a refresh in flight before answering from the cache


@dataclass(slots=True, frozen=True)
class VersionInfo:
    round_id: str
    subnet_accuracy: tuple[float, ...]


@dataclass(slots=True, frozen=True)
class Target:
    model_hash: str
    round_id: str


REVOKED = "revoked"
STOPPING = "stopping"


class WatchStream:
    """One open WatchUpdates stream: the hub sets its next message, the handler waits for it
    with its keepalive as the timeout. A slot, not a queue: only the newest target matters."""

    __slots__ = ("device_id", "last_sent", "_event", "_next")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.last_sent: str | None = None
        self._event = asyncio.Event()
        self._next: Target | str | None = None

    def push(self, message: Target | str) -> None:
        if self._next in (REVOKED, STOPPING):
            return  # an end is final
        self._next = message
        self._event.set()

    async def next(self, timeout: float) -> Target | str | None:
        """The next message (a Target, REVOKED or STOPPING), or None after ``timeout``."""
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        self._event.clear()
        message, self._next = self._next, None
        if message in (REVOKED, STOPPING):
            self._next = message  # stays ended
        return message


@dataclass(slots=True)
class _Read:
    targets: dict[str, str]  # device id -> target hash (revoked and deleted devices absent)
    credentials: dict[str, str]  # device id -> current credential hash (same devices)
    versions: dict[str, VersionInfo]


class StreamHub:
    def __init__(self, factory: sessionmaker[Session], run_blocking: Callable[..., Awaitable[object]], *,
                 resync_s: float, max_devices: int = 200_000) -> None:
        self.factory = factory
        self._run = run_blocking
        self.resync_s = resync_s
        self.max_devices = max_devices
        self.targets: OrderedDict[str, str] = OrderedDict()  # device id -> target hash
        self.versions: OrderedDict[str, VersionInfo] = OrderedDict()
        self.streams: dict[str, set[WatchStream]] = {}
        self._dirty: set[str] | None = set()  # None: every known device
        self._refreshing: asyncio.Task | None = None
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resync: asyncio.Task | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self.generation = 0  # dirty marks so far: a read that began before one may be stale
        self.refreshes = 0  # batched reads done (tests and the bench count them)
        # Called on the loop with device id -> current credential hash (None: revoked or gone)
        # for every device a refresh read: the credential cache drops what no longer matches.
        self.on_credentials: Callable[[dict[str, str | None]], None] | None = None

    # --- lifecycle (on the loop) ---------------------------------------------------------

    def start(self, targets_changed: Notifier, devices_changed: Notifier) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._unsubscribe = [targets_changed.subscribe(self._on_targets),
                             devices_changed.subscribe(self._on_device)]
        self._resync = self._loop.create_task(self._resync_loop(), name="hub-resync")

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        for task in (self._resync, self._refreshing):
            if task is not None:
                task.cancel()
        for streams in list(self.streams.values()):
            for st in streams:
                st.push(STOPPING)

    # --- events (any thread) -------------------------------------------------------------

    def _on_targets(self, payload: Payload) -> None:
        ids = (payload or {}).get("device_ids")
        self._hop(None if ids is None else list(ids))

    def _on_device(self, payload: Payload) -> None:
        device_id = (payload or {}).get("device_id")
        if device_id:
            self._hop([device_id])
        elif payload is None:  # the bus reconnected: re-read every known device
            self._hop(None)

    def _hop(self, ids: list[str] | None) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self.mark, ids)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    # --- refresh (on the loop) -----------------------------------------------------------

    def mark(self, ids: Iterable[str] | None) -> None:
        """Re-read these devices (None: all known) soon, in one coalesced refresh."""
        self.generation += 1
        if ids is None:
            self._dirty = None
        elif self._dirty is not None:
            self._dirty.update(i for i in ids if i in self.targets or i in self.streams)
        if (self._dirty is None or self._dirty) and self._refreshing is None and self._loop is not None:
            assert self._idle is not None
            self._idle.clear()
            self._refreshing = self._loop.create_task(self._refresh_loop(), name="hub-refresh")

    async def _refresh_loop(self) -> None:
        try:
            while self._dirty is None or self._dirty:
                dirty, self._dirty = self._dirty, set()
                ids = list(self.targets) if dirty is None else list(dirty)
                try:
                    read = cast(_Read, await self._run(self._read, ids, frozenset(self.versions), shed=False))
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the next event or resync tries again
                    log.exception("stream hub: reading %d devices' targets failed", len(ids))
                    continue
                self._apply(ids, read)
        finally:
            self._refreshing = None
            if self._idle is not None:
                self._idle.set()

    def _read(self, ids: list[str], known_versions: frozenset[str]) -> _Read:
        """One read (a database thread): the targets of ``ids`` and the new target versions."""
        targets: dict[str, str] = {}
        credentials: dict[str, str] = {}
        versions: dict[str, VersionInfo] = {}
        with self.factory() as s:
            for start in range(0, len(ids), CHUNK):
                part = ids[start : start + CHUNK]
                for device_id, target, revoked, credential_hash in s.execute(
                        select(Device.id, Device.target_model_hash, Device.revoked, Device.credential_hash)
                        .where(Device.id.in_(part))):
                    if not revoked:
                        targets[device_id] = target
                        credentials[device_id] = credential_hash
            wanted = sorted({t for t in targets.values() if t and t not in known_versions})
            for start in range(0, len(wanted), CHUNK):
                part = wanted[start : start + CHUNK]
                for model_hash, round_id, metrics in s.execute(
                        select(ModelVersion.model_hash, ModelVersion.round_id, ModelVersion.metrics)
                        .where(ModelVersion.model_hash.in_(part))):
                    versions[model_hash] = version_info(round_id, metrics)
        self.refreshes += 1
        return _Read(targets, credentials, versions)

    def _apply(self, ids: list[str], read: _Read) -> None:
        for model_hash, info in read.versions.items():
            self._remember_version(model_hash, info)
        if self.on_credentials is not None:  # a credential changed without an event: the cache follows
            self.on_credentials({i: read.credentials.get(i) for i in ids})
        for device_id in ids:
            target = read.targets.get(device_id)
            if target is None:  # revoked or deleted: its streams end, its target is forgotten
                self.targets.pop(device_id, None)
                for st in self.streams.get(device_id, ()):
                    st.push(REVOKED)
                continue
            self._remember_target(device_id, target)
            for st in self.streams.get(device_id, ()):
                if st.last_sent != target:
                    st.push(Target(target, self.round_of(target)))

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            if self.targets:
                self.mark(None)

    # --- caches --------------------------------------------------------------------------

    def _remember_target(self, device_id: str, target: str) -> None:
        self.targets[device_id] = target
        self.targets.move_to_end(device_id)
        for _ in range(len(self.targets) - self.max_devices):
            old, value = self.targets.popitem(last=False)
            if old in self.streams:  # a device with an open stream is never forgotten
                self.targets[old] = value

    def _remember_version(self, model_hash: str, info: VersionInfo) -> None:
        self.versions[model_hash] = info
        self.versions.move_to_end(model_hash)
        while len(self.versions) > MAX_VERSIONS:
            self.versions.popitem(last=False)

    def round_of(self, target: str) -> str:
        info = self.versions.get(target)
        return info.round_id if info is not None else ""

    def seed(self, device_id: str, target: str, generation: int) -> None:
        """What a database read that began at ``generation`` found: cached; re-read if an
        event came in since (the read may predate it)."""
        self._remember_target(device_id, target)
        if generation != self.generation:
            self.mark([device_id])

    async def target(self, device_id: str) -> tuple[str, VersionInfo | None] | None:
        """The device's current target and its version's info; None for a revoked or unknown
        device. A refresh in flight is waited for (briefly), so an answer never predates a
        publish this process has heard of."""
        if self._idle is not None and not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), SETTLE_WAIT_S)
            except asyncio.TimeoutError:
                pass
        target = self.targets.get(device_id)
        if target is None or (target and target not in self.versions):
            generation = self.generation
            read = cast(_Read, await self._run(self._read, [device_id], frozenset(self.versions), shed=True))
            for model_hash, info in read.versions.items():
                self._remember_version(model_hash, info)
            target = read.targets.get(device_id)
            if target is None:
                return None
            self.seed(device_id, target, generation)
        return target, self.versions.get(target)

    # --- streams (on the loop) -----------------------------------------------------------

    def open(self, device_id: str) -> WatchStream:
        st = WatchStream(device_id)
        self.streams.setdefault(device_id, set()).add(st)
        return st

    def close(self, st: WatchStream) -> None:
        streams = self.streams.get(st.device_id)
        if streams is not None:
            streams.discard(st)
            if not streams:
                del self.streams[st.device_id]

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self.streams.values())


def version_info(round_id: str | None, metrics: dict | None) -> VersionInfo:
    accs = (metrics or {}).get("subnet_val_accuracy") or []
    return VersionInfo(round_id or "", tuple(float(a) for a in accs))
