"""Token-bucket rate limits keyed by a string (a device id, a peer address). Pure: the clock
is injected, nothing here knows gRPC.

Each key has a bucket of ``burst`` tokens refilled at ``rate_per_s``; a call takes one. A
refused call is told how long until one is available: the servicer sends that as the
``retry-after-ms`` hint (docs/protocol.md). Memory is bounded: at most ``max_keys`` buckets
are kept and the least recently used is dropped first (after that long idle it has usually
refilled, so dropping it forgives little).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class RateLimited(Exception):
    """A call over its limit; ``retry_after_s`` is how long until it would be allowed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))


@dataclass(slots=True)  # one per key, up to max_keys of them
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """``rate_per_s`` 0 turns the limit off (every call is allowed)."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s >= 0):
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate_per_s)
            b.at = now
        return b

    def try_acquire(self, key: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available (and
        nothing is taken)."""
        if not self.enabled:
            return 0.0
        with self._lock:
            b = self._bucket(key, self._clock())
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate_per_s

    def acquire(self, key: str, what: str) -> None:
        """:meth:`try_acquire` that raises :class:`RateLimited` naming ``what`` when refused."""
        wait = self.try_acquire(key)
        if wait > 0:
            raise RateLimited(f"{what}: rate limit of {self.rate_per_s:g}/s (burst {self.burst}) "
                              f"exceeded; retry in {wait:.3g} s", wait)

    def refund(self, key: str) -> None:
        """Give back the token a call took (a Register that succeeded: only failures count)."""
        if not self.enabled:
            return
        with self._lock:
            b = self._bucket(key, self._clock())
            b.tokens = min(float(self.burst), b.tokens + 1.0)
