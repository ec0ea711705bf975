"""The agent server's blocking work (database transactions, blob reads) on a bounded thread
pool, awaited from the event loop.

The pool is sized to the database connection pool: more threads would only queue on
connections. Calls from agents are *shed* when too much work is already waiting: the caller
gets :class:`Overloaded` (a :class:`RateLimited`, answered RESOURCE_EXHAUSTED with a
``retry-after-ms`` hint estimated from the queue and the recent cost of a call) instead of
waiting in a queue it cannot see the end of. The server's own work (heartbeat flushes, stream
fan-out reads) is never shed.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Engine

from server.grpc_api.ratelimit import RateLimited

T = TypeVar("T")
DEFAULT_THREADS = 16  # pools that do not say their size (SQLite's default is 5 + 10 overflow)
PENDING_PER_THREAD = 64  # default bound of waiting calls: a few seconds of work at ~1-5 ms each
MIN_RETRY_S, MAX_RETRY_S = 0.2, 30.0


class Overloaded(RateLimited):
    """More blocking work is waiting than the server accepts; retry after the hint."""


def pool_threads(engine: Engine) -> int:
    """Connections the engine's pool can open at once (size + overflow)."""
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", 0)
    if callable(size):
        n = int(size()) + max(0, int(overflow or 0))
        if n > 0:
            return n
    return DEFAULT_THREADS


class BlockingPool:
    def __init__(self, threads: int, max_pending: int = 0) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.max_pending = max_pending or threads * PENDING_PER_THREAD
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agent-db")
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished (running + queued)
        self._avg_s = 0.005  # moving average of one call's duration: the retry-after estimate
        self.shed = 0  # calls refused so far

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after_s(self) -> float:
        """Time for the threads to work off the current queue."""
        return min(MAX_RETRY_S, max(MIN_RETRY_S, self._pending * self._avg_s / self.threads))

    async def run(self, fn: Callable[..., T], *args: object, shed: bool = True) -> T:
        """``fn(*args)`` on a pool thread. ``shed``: refuse with :class:`Overloaded` when
        ``max_pending`` calls are already waiting (nothing is run then)."""
        with self._lock:
            if shed and self._pending >= self.max_pending:
                self.shed += 1
                wait = self.retry_after_s()
                raise Overloaded(f"server busy: {self._pending} database calls waiting (at most "
                                 f"{self.max_pending}); retry in {wait:.3g} s", wait)
            self._pending += 1
        try:
            future = self._executor.submit(functools.partial(self._timed, fn, *args))
        except BaseException:
            self._done(None)
            raise
        # Counted until the thread is done with it (a cancelled caller does not stop a running call).
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """``fn(*args)`` on a pool thread, not awaited (never shed: the server's own work)."""
        with self._lock:
            self._pending += 1
        try:
            self._executor.submit(functools.partial(self._timed, fn, *args)).add_done_callback(self._done)
        except BaseException:
            self._done(None)
            raise

    def _done(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def _timed(self, fn: Callable[..., T], *args: object) -> T:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._avg_s += 0.05 * (dt - self._avg_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
