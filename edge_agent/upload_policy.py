"""Which captured samples to upload, within a rate limit.

Uplink bytes are the scarce resource on a cellular device, and the samples the model is
unsure about are the ones most worth retraining on (uncertainty sampling), so besides
``"all"`` and ``"none"`` the policy can upload only predictions whose confidence is below a
threshold. A token bucket caps the rate: up to ``max_per_minute`` on average, with bursts of
at most one minute's worth.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

MODES = ("all", "low_confidence", "none")


class UploadPolicy:
    """Decides per prediction whether to queue its sample for upload."""

    def __init__(
        self,
        mode: str = "all",
        confidence_threshold: float = 0.6,
        max_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"upload mode must be one of {MODES}, got {mode!r}")
        if not (math.isfinite(confidence_threshold) and 0.0 <= confidence_threshold <= 1.0):
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}")
        if max_per_minute is not None and not (
            math.isfinite(max_per_minute) and max_per_minute > 0
        ):
            raise ValueError(
                f"max_per_minute must be a positive finite number or None, got {max_per_minute}"
            )
        self.mode = mode
        self.confidence_threshold = float(confidence_threshold)
        self.max_per_minute = None if max_per_minute is None else float(max_per_minute)
        self._clock = clock
        self._lock = threading.Lock()
        # Burst of one minute's worth (at least one sample); starts full.
        self._capacity = max(1.0, self.max_per_minute or 0.0)
        self._tokens = self._capacity
        self._last = clock()

    def _take_token(self) -> bool:
        if self.max_per_minute is None:
            return True
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)  # a clock that steps back must not drain tokens
            self._last = now
            self._tokens = min(self._capacity, self._tokens + elapsed * self.max_per_minute / 60.0)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def should_upload(self, confidence: float) -> bool:
        """True if this prediction's sample should be queued (consumes a rate token)."""
        confidence = float(confidence)
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"confidence must lie in [0, 1], got {confidence}")
        if self.mode == "none":
            return False
        if self.mode == "low_confidence" and confidence >= self.confidence_threshold:
            return False
        return self._take_token()
