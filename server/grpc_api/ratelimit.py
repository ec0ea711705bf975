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


class StreamLimiter:
    """At most ``max_per_key`` streams open per key at once (``0``: no limit). :meth:`open`
    returns the release function of the slot it took (idempotent: call it from every way a
    stream can end); over the cap it raises :class:`RateLimited` with ``retry_after_s``, since
    a stream slot frees when another stream ends, not at a rate. Memory: one counter per key
    with streams open, removed when its last stream ends."""

    def __init__(self, max_per_key: int, *, retry_after_s: float = 5.0) -> None:
        if max_per_key < 0:
            raise ValueError(f"max_per_key must be >= 0, got {max_per_key}")
        self.max_per_key = int(max_per_key)
        self.retry_after_s = float(retry_after_s)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_count(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)

    def open(self, key: str, what: str) -> Callable[[], None]:
        if self.max_per_key == 0:
            return lambda: None
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.max_per_key:
                raise RateLimited(f"{what}: {n} streams already open, at most {self.max_per_key} at once; "
                                  f"retry in {self.retry_after_s:g} s", self.retry_after_s)
            self._open[key] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open.get(key, 1) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)

        return release
