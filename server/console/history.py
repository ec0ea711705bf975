"""Per-device accuracy over time for the console: the heartbeat only keeps a device's latest
metrics, so this samples them at the heartbeat interval into a bounded ring per device.

In memory, per REST process (a replica shows what it sampled since it started); nothing here is
written to the database, so the console adds no load to the heartbeat path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from sqlalchemy import select

from server.context import ServerContext
from server.db.models import Device

log = logging.getLogger(__name__)

POINTS_PER_DEVICE = 720  # an hour at the default 5 s heartbeat
MAX_DEVICES = 20_000


@dataclass(frozen=True)
class Point:
    at: float  # Unix seconds, server clock
    accuracy: float | None
    model_hash: str
    active_subnet: int


def accuracy_of(metrics: dict) -> float | None:
    """The agent's accuracy on its recent labelled inputs (older agents: ``accuracy``)."""
    value = metrics.get("recent_accuracy", metrics.get("accuracy"))
    return None if value is None else float(value)


class MetricsHistory:
    def __init__(self, ctx: ServerContext, interval_s: float | None = None) -> None:
        self.ctx = ctx
        self.interval_s = interval_s or ctx.settings.heartbeat_interval_s
        self._points: dict[str, deque[Point]] = {}
        self._last_seen: dict[str, object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="console-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the sampler
                log.debug("console history: sampling failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def sample(self) -> int:
        """Record one point per device heard from since the last sample; returns how many."""
        with self.ctx.factory() as s:
            rows = s.execute(select(Device.id, Device.last_seen_at, Device.metrics, Device.model_hash,
                                    Device.active_subnet).where(Device.revoked.is_(False))
                             .order_by(Device.last_seen_at.desc()).limit(MAX_DEVICES)).all()
        now = time.time()
        n = 0
        with self._lock:
            for device_id, seen, metrics, model_hash, subnet in rows:
                if seen is None or self._last_seen.get(device_id) == seen:
                    continue  # no heartbeat since: nothing new to record
                self._last_seen[device_id] = seen
                ring = self._points.setdefault(device_id, deque(maxlen=POINTS_PER_DEVICE))
                ring.append(Point(now, accuracy_of(metrics or {}), model_hash or "", int(subnet)))
                n += 1
        return n

    def points(self, device_id: str) -> list[Point]:
        with self._lock:
            return list(self._points.get(device_id, ()))
