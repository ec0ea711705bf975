"""Exponential backoff with jitter.

A fleet of agents that lose the server at the same moment must not come back in lock-step,
so delays use AWS-style "full jitter" (Brooker, *Exponential Backoff and Jitter*, 2015):
``delay = uniform(0, min(maximum, initial * multiplier ** attempt))``. A seeded ``rng``
makes the sequence reproducible in tests.
"""

from __future__ import annotations

import math
import random

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

