"""Exponential backoff with jitter.

A fleet of agents that lose the server at the same moment must not come back in lock-step,
so delays use AWS-style "full jitter" (Brooker, *Exponential Backoff and Jitter*, 2015):
``delay = uniform(0, min(maximum, initial * multiplier ** attempt))``. A seeded ``rng``
makes the sequence reproducible in tests.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable

JITTERS = ("full", "equal", "none")
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of the server's RESOURCE_EXHAUSTED
MAX_RETRY_AFTER_S = 600.0  # a hint is obeyed up to this: a broken server cannot park the agent for good


class Backoff:
    """Delays for successive retries; :meth:`reset` after a success.

    ``jitter``: ``"full"`` draws from ``[0, cap]``, ``"equal"`` from ``[cap/2, cap]`` (never
    retries immediately), ``"none"`` returns ``cap`` itself (deterministic, for tests and
    for single devices where herd effects do not matter).
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 60.0,
        multiplier: float = 2.0,
        jitter: str = "full",
        rng: random.Random | None = None,
    ) -> None:
        if not (math.isfinite(initial) and initial > 0):
            raise ValueError(f"initial delay must be a positive finite number, got {initial}")
        if not (math.isfinite(maximum) and maximum >= initial):
            raise ValueError(
                f"maximum delay must be finite and >= initial ({initial}), got {maximum}"
            )
        if not (math.isfinite(multiplier) and multiplier >= 1.0):
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier}")
        if jitter not in JITTERS:
            raise ValueError(f"jitter must be one of {JITTERS}, got {jitter!r}")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.multiplier = float(multiplier)
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def cap(self) -> float:
        """The un-jittered ceiling for the next delay."""
        # A device may retry for weeks: past ~1000 attempts the power overflows a float.
        try:
            raw = self.initial * self.multiplier**self.attempt
        except OverflowError:
            return self.maximum
        return min(self.maximum, raw)

    def next_delay(self, error: BaseException | None = None) -> float:
        """Seconds to wait before the next attempt; advances the attempt counter. Never less
        than the server's retry-after hint carried by ``error`` (``retry_after_s``)."""
        cap = self.cap()
        self.attempt += 1
        if self.jitter == "full":
            delay = self._rng.uniform(0.0, cap)
        elif self.jitter == "equal":
            delay = cap / 2 + self._rng.uniform(0.0, cap / 2)
        else:
            delay = cap
        return max(delay, float(getattr(error, "retry_after_s", 0.0) or 0.0))

    def reset(self) -> None:
        """Start again from ``initial`` (call after a success)."""
        self.attempt = 0



def retry_after_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float:
    """The server's ``retry-after-ms`` hint in seconds (0.0: none, or not a number), at most
    :data:`MAX_RETRY_AFTER_S`."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return 0.0
            return min(max(ms, 0) / 1000.0, MAX_RETRY_AFTER_S)
    return 0.0


class RetryAfter:
    """The earliest time the server accepts our next call: each hint pushes it out, and
    :meth:`remaining` says how long is left. The server's limit is per device across all
    calls, so one gate serves every call of a client."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._not_before = -math.inf
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._not_before = max(self._not_before, self._clock() + seconds)

    def remaining(self) -> float:
        with self._lock:
            return max(0.0, self._not_before - self._clock())
