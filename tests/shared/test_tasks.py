"""N-way K-shot task sampling and class splits (shared/data/tasks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.tasks import TaskError, TaskSampler, class_split


def _data(classes: int = 8, per_class: int = 6):
    y = np.repeat(np.arange(classes), per_class)
    x = (np.arange(len(y))[:, None, None] % 256).astype(np.uint8) * np.ones((1, 4, 4), dtype=np.uint8)
    return x, y  # sample i's pixels are all i: its identity is readable from the image


def test_tasks_have_the_requested_shape_labels_and_disjoint_sets():
    x, y = _data()
    sampler = TaskSampler(x, y, ways=3, shots=2, queries=3, seed=5)
    task = sampler.sample()
    assert task.support_x.shape == (6, 4, 4) and task.query_x.shape == (9, 4, 4)
    assert task.support_x.dtype == torch.float32 and float(task.support_x.max()) <= 1.0
    assert sorted(task.support_y.tolist()) == [0, 0, 1, 1, 2, 2] and task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ids_s = set((task.support_x[:, 0, 0] * 255).round().int().tolist())
    ids_q = set((task.query_x[:, 0, 0] * 255).round().int().tolist())
    assert not ids_s & ids_q and len(ids_s) == 6 and len(ids_q) == 9
    for label in range(3):  # one original class per relabelled class, in support and query
        orig = {y[i] for i, lab in zip((task.support_x[:, 0, 0] * 255).round().int().tolist(), task.support_y.tolist(),
                                       strict=True) if lab == label}  # fmt: skip
        orig |= {y[i] for i, lab in zip((task.query_x[:, 0, 0] * 255).round().int().tolist(), task.query_y.tolist(),
                                        strict=True) if lab == label}  # fmt: skip
        assert len(orig) == 1


def test_sampling_is_deterministic_and_respects_class_restrictions():
    x, y = _data()
    a = TaskSampler(x, y, ways=2, shots=1, queries=1, seed=1, classes=[0, 1, 2])
    b = TaskSampler(x, y, ways=2, shots=1, queries=1, seed=1, classes=[0, 1, 2])
    for _ in range(5):
        ta, tb = a.sample(), b.sample()
        assert torch.equal(ta.support_x, tb.support_x) and torch.equal(ta.query_y, tb.query_y)
        assert set((ta.support_x[:, 0, 0] * 255).round().int().tolist()) < set(range(18))
    assert a.classes_available.tolist() == [0, 1, 2]


def test_too_few_classes_or_samples_are_refused():
    x, y = _data(classes=4, per_class=3)
    with pytest.raises(TaskError, match="need 5 classes"):
        TaskSampler(x, y, ways=5, shots=1, queries=1, seed=0)
    with pytest.raises(TaskError, match=">= 4 samples"):
        TaskSampler(x, y, ways=2, shots=2, queries=2, seed=0)
    with pytest.raises(TaskError):
        TaskSampler(x, y, ways=2, shots=0, queries=1, seed=0)


def test_class_split_is_disjoint_and_covers_every_label():
    y = np.repeat(np.arange(20), 2)
    parts = class_split(y, (0.6, 0.2, 0.2), seed=3)
    assert [len(p) for p in parts] == [12, 4, 4]
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all(np.array_equal(p, q) for p, q in zip(parts, class_split(y, (0.6, 0.2, 0.2), seed=3), strict=True))
