"""In-process wake-ups: the round worker when a round is queued, watchers when a target moves.

Cross-process deployments still work without it: the worker polls and watch streams re-read
the database at every keepalive, so a notification only makes things prompt.
"""

from __future__ import annotations

import threading


class Notifier:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the generation differs from ``seen`` or ``timeout`` passes; return it."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout=timeout)
            return self._generation
