"""Exponential backoff with jitter, and a retry wrapper around it.

A fleet of agents that lose the server at the same moment must not come back in lock-step,
so delays use AWS-style "full jitter" (Brooker, *Exponential Backoff and Jitter*, 2015):
``delay = uniform(0, min(maximum, initial * multiplier ** attempt))``. A seeded ``rng``
makes the sequence reproducible in tests.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
JITTERS = ("full", "equal", "none")


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

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; advances the attempt counter."""
        cap = self.cap()
        self.attempt += 1
        if self.jitter == "full":
            return self._rng.uniform(0.0, cap)
        if self.jitter == "equal":
            return cap / 2 + self._rng.uniform(0.0, cap / 2)
        return cap

    def reset(self) -> None:
        """Start again from ``initial`` (call after a success)."""
        self.attempt = 0


def retry_call(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    give_up: Callable[[Exception], bool],
    sleep: Callable[[float], object] = time.sleep,
    max_attempts: int | None = None,
    on_retry: Callable[[int, Exception, float], object] | None = None,
) -> T:
    """Call ``fn`` until it succeeds; re-raise when ``give_up(exc)`` or attempts run out.

    ``give_up`` separates permanent errors (bad request, auth refused) from transient ones
    (connection reset); only the latter are worth waiting for. ``on_retry(attempt, exc,
    delay)`` runs before each sleep (attempt counts from 1). The backoff is reset on success
    so that one flaky period does not inflate the delays of the next one.
    """
    if max_attempts is not None and max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1 or None, got {max_attempts}")
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            if give_up(exc):
                raise
            if max_attempts is not None and attempt >= max_attempts:
                logger.warning("giving up after %d attempts: %s", attempt, exc)
                raise
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            else:
                logger.info("attempt %d failed (%s); retrying in %.2f s", attempt, exc, delay)
            sleep(delay)
        else:
            backoff.reset()
            return result
