"""Wake-ups with a small payload: the round worker when a round is queued, agent streams when
targets move, credential caches when a device is revoked.

A ``Notifier`` is in-process. ``forward`` (set by the event bus, server/events) carries a local
``notify`` to other processes and replicas; what arrives from them comes in by ``deliver``, which
wakes local waiters and subscribers without sending it out again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
Payload = dict | None
Subscriber = Callable[[Payload], None]


class Notifier:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._generation = 0
        self._subscribers: list[Subscriber] = []
        self.forward: Callable[[Payload], None] | None = None

    def notify(self, payload: Payload = None) -> None:
        """Wake local waiters and subscribers, then forward to other processes (if bridged)."""
        self.deliver(payload)
        forward = self.forward
        if forward is not None:
            try:
                forward(payload)
            except Exception:  # noqa: BLE001 - a broken bus must not fail the caller's commit
                log.exception("notifier %s: forwarding failed (remote replicas catch up at their next poll)", self.name)

    def deliver(self, payload: Payload = None) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
            subscribers = list(self._subscribers)
        for callback in subscribers:  # outside the lock: a callback may notify again
            try:
                callback(payload)
            except Exception:  # noqa: BLE001
                log.exception("notifier %s: subscriber failed", self.name)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """``callback(payload)`` runs in the notifying thread after every notify/deliver; it
        must be quick (hand work to a loop or queue). Returns the unsubscribe function."""
        with self._cond:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the generation differs from ``seen`` or ``timeout`` passes; return it."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout=timeout)
            return self._generation
