"""A bounded log of recent predictions, for on-device accuracy and confidence figures.

The agent reports how the installed model is doing (overall and per model hash, so a fresh
update can be compared with the one before it) without keeping an unbounded history on the
device: a fixed-capacity ring buffer holds the last ``capacity`` predictions.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Prediction:
    predicted: int
    confidence: float  # the model's probability of ``predicted``, in [0, 1]
    label: int | None  # ground truth when known (simulation, user feedback), else None
    model_hash: str
    timestamp: float  # unix seconds


def _stats(entries: list[Prediction]) -> dict[str, Any]:
    labelled = [p for p in entries if p.label is not None]
    correct = sum(p.predicted == p.label for p in labelled)
    return {
        "count": len(entries),
        "labelled": len(labelled),
        "accuracy": correct / len(labelled) if labelled else None,
        "mean_confidence": sum(p.confidence for p in entries) / len(entries) if entries else None,
    }


class PredictionLog:
    """Thread-safe ring buffer of :class:`Prediction` (inference thread adds, status reads)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._entries: deque[Prediction] = deque(maxlen=self.capacity)
        self._lock = threading.Lock()

    def add(
        self,
        predicted: int,
        confidence: float,
        label: int | None = None,
        model_hash: str = "",
        timestamp: float | None = None,
    ) -> Prediction:
        """Record one prediction; the oldest one falls out once ``capacity`` is reached."""
        confidence = float(confidence)
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"confidence must lie in [0, 1], got {confidence}")
        entry = Prediction(
            predicted=int(predicted),
            confidence=confidence,
            label=None if label is None else int(label),
            model_hash=str(model_hash),
            timestamp=time.time() if timestamp is None else float(timestamp),
        )
        with self._lock:
            self._entries.append(entry)
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def accuracy(self, model_hash: str | None = None) -> float | None:
        """Fraction correct over labelled entries (of one model if given); None if none."""
        with self._lock:
            entries = [p for p in self._entries if model_hash is None or p.model_hash == model_hash]
        return _stats(entries)["accuracy"]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: count, labelled, accuracy, mean_confidence, and the same per model hash."""
        with self._lock:
            entries = list(self._entries)
        per_model: dict[str, list[Prediction]] = {}
        for p in entries:
            per_model.setdefault(p.model_hash, []).append(p)
        out = _stats(entries)
        out["per_model"] = {h: _stats(group) for h, group in per_model.items()}
        return out

    def recent(self, n: int) -> list[Prediction]:
        """The last ``n`` predictions, oldest first."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self._lock:
            return list(self._entries)[-n:] if n else []

    def recent_dicts(self, n: int) -> list[dict[str, Any]]:
        """:meth:`recent` as JSON-ready dicts (for the status endpoint)."""
        return [asdict(p) for p in self.recent(n)]
