from __future__ import annotations

import json
import threading

import pytest

from edge_agent.predictions import PredictionLog

A, B = "a" * 64, "b" * 64


def test_accuracy_counts_only_labelled_entries():
    log = PredictionLog()
    assert log.accuracy() is None
    log.add(3, 0.9, label=3, model_hash=A)
    log.add(1, 0.4, label=2, model_hash=A)
    log.add(5, 0.8, label=None, model_hash=A)
    log.add(7, 0.7, label=7, model_hash=B)
    assert log.accuracy() == pytest.approx(2 / 3)
    assert log.accuracy(A) == pytest.approx(1 / 2)
    assert log.accuracy(B) == 1.0
    assert log.accuracy("c" * 64) is None


def test_summary_is_json_ready_and_split_by_model():
    log = PredictionLog()
    log.add(0, 0.5, label=0, model_hash=A)
    log.add(1, 0.3, label=None, model_hash=A)
    log.add(2, 1.0, label=1, model_hash=B)
    s = json.loads(json.dumps(log.summary()))
    assert s["count"] == 3 and s["labelled"] == 2
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["mean_confidence"] == pytest.approx(0.6)
    assert s["per_model"][A] == {"count": 2, "labelled": 1, "accuracy": 1.0, "mean_confidence": 0.4}
    assert s["per_model"][B]["accuracy"] == 0.0


def test_ring_buffer_keeps_the_most_recent_entries():
    log = PredictionLog(capacity=10)
    for i in range(25):
        log.add(i % 2, 0.5, label=0, model_hash=A, timestamp=float(i))  # right iff i is even
    assert len(log) == 10
    assert [p.timestamp for p in log.recent(3)] == [22.0, 23.0, 24.0]
    assert [p.timestamp for p in log.recent(100)] == [float(i) for i in range(15, 25)]
    assert log.recent(0) == []
    assert log.accuracy() == pytest.approx(5 / 10)  # 16, 18, 20, 22, 24 among 15..24


def test_concurrent_adds_are_all_counted():
    log = PredictionLog(capacity=5000)

    def worker(w: int) -> None:
        for i in range(500):
            log.add(w, 0.5, label=w if i % 2 else -1, model_hash=str(w))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = log.summary()
    assert s["count"] == 2000 and s["labelled"] == 2000
    assert s["accuracy"] == pytest.approx(0.5)
    assert all(m["count"] == 500 for m in s["per_model"].values())


@pytest.mark.parametrize("confidence", [-0.1, 1.5, float("nan")])
def test_confidence_outside_unit_interval_is_refused(confidence):
    with pytest.raises(ValueError, match="confidence"):
        PredictionLog().add(0, confidence)


def test_bad_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        PredictionLog(capacity=0)
