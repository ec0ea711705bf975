"""N-way K-shot few-shot tasks from class-labelled data (thesis §4.3.2), and class splits.

A task draws ``ways`` classes, then ``shots`` support and ``queries`` query samples of each,
without replacement, and relabels the classes 0..ways-1 in the order drawn. Samplers are seeded
(numpy PCG64) so a benchmark's test tasks are the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.tensors import to_model_input

__all__ = ["Task", "TaskError", "TaskSampler", "class_split", "to_model_input"]


class TaskError(ValueError):
    """The data cannot provide the requested tasks (too few classes or samples per class)."""


@dataclass(frozen=True)
class Task:
    support_x: torch.Tensor  # (ways * shots, *input) float32 in [0, 1] for uint8 data
    support_y: torch.Tensor  # (ways * shots,) int64 in 0..ways-1
    query_x: torch.Tensor  # (ways * queries, *input)
    query_y: torch.Tensor


class TaskSampler:
    """Draws N-way K-shot tasks from ``x`` (as stored, e.g. uint8 images) and labels ``y``.

    ``classes``: restrict to these labels (a class split); default every label with at least
    ``shots + queries`` samples (``classes_available``)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, ways: int, shots: int, queries: int, seed: int,
                 classes: np.ndarray | list[int] | None = None) -> None:  # fmt: skip
        for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise TaskError(f"{name} must be a positive integer, got {v!r}")
        if ways < 2:
            raise TaskError(f"ways must be >= 2, got {ways}")
        y = np.asarray(y)
        if len(x) != len(y) or y.ndim != 1:
            raise TaskError(f"x has {len(x)} samples but y has shape {y.shape}")
        self.x, self.ways, self.shots, self.queries = x, int(ways), int(shots), int(queries)
        need = self.shots + self.queries
        wanted = np.unique(y) if classes is None else np.unique(np.asarray(classes))
        self._index = {int(c): np.flatnonzero(y == c) for c in wanted}
        self.classes_available = np.array(sorted(c for c, idx in self._index.items() if len(idx) >= need),
                                          dtype=np.int64)  # fmt: skip
        if len(self.classes_available) < self.ways:
            raise TaskError(
                f"{self.ways}-way {self.shots}-shot tasks with {self.queries} queries need {self.ways} classes "
                f"of >= {need} samples; only {len(self.classes_available)} of {len(wanted)} have that many"
            )
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self) -> Task:
        chosen = self._rng.choice(self.classes_available, size=self.ways, replace=False)
        s_idx, q_idx = [], []
        for c in chosen:
            picks = self._rng.choice(self._index[int(c)], size=self.shots + self.queries, replace=False)
            s_idx.append(picks[: self.shots])
            q_idx.append(picks[self.shots :])
        labels = np.arange(self.ways, dtype=np.int64)
        s_perm = self._rng.permutation(self.ways * self.shots)
        support = np.concatenate(s_idx)[s_perm]
        support_y = np.repeat(labels, self.shots)[s_perm]
        query = np.concatenate(q_idx)
        query_y = np.repeat(labels, self.queries)
        return Task(to_model_input(np.ascontiguousarray(self.x[support])), torch.from_numpy(support_y),
                    to_model_input(np.ascontiguousarray(self.x[query])), torch.from_numpy(query_y))  # fmt: skip


def class_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Disjoint label sets (an in-domain split: meta-train, validation, test classes), one per
    fraction of the distinct labels, shuffled by ``seed``; the last takes the remainder."""
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise TaskError(f"fractions must be positive and sum to at most 1, got {fractions}")
    labels = np.unique(np.asarray(y))
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = labels[rng.permutation(len(labels))]
    out, start = [], 0
    for i, f in enumerate(fractions):
        end = len(labels) if i == len(fractions) - 1 and abs(sum(fractions) - 1) < 1e-9 else start + int(round(f * len(labels)))
        out.append(np.sort(labels[start:end]))
        start = end
    return out
