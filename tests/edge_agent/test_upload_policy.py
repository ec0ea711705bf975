from __future__ import annotations

import pytest

from edge_agent.upload_policy import UploadPolicy


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_modes_without_rate_limit():
    assert all(UploadPolicy("all").should_upload(c) for c in (0.0, 0.5, 1.0))
    assert not any(UploadPolicy("none").should_upload(c) for c in (0.0, 0.5, 1.0))
    low = UploadPolicy("low_confidence", confidence_threshold=0.6)
    assert [low.should_upload(c) for c in (0.1, 0.59, 0.6, 0.95)] == [True, True, False, False]


def test_rate_limit_allows_a_minute_of_burst_then_the_average_rate():
    clock = FakeClock()
    policy = UploadPolicy("all", max_per_minute=6, clock=clock)
    assert [policy.should_upload(0.5) for _ in range(8)] == [True] * 6 + [False] * 2
    clock.t += 9.0  # 0.9 of a token
    assert not policy.should_upload(0.5)
    clock.t += 1.0
    assert policy.should_upload(0.5) and not policy.should_upload(0.5)
    clock.t += 3600  # a long idle period refills only up to the burst size
    assert sum(policy.should_upload(0.5) for _ in range(20)) == 6


def test_confident_predictions_do_not_consume_the_budget():
    clock = FakeClock()
    policy = UploadPolicy("low_confidence", confidence_threshold=0.5, max_per_minute=2, clock=clock)
    for _ in range(50):
        assert not policy.should_upload(0.9)
    assert policy.should_upload(0.1) and policy.should_upload(0.2)
    assert not policy.should_upload(0.3)


def test_clock_stepping_back_does_not_break_the_bucket():
    clock = FakeClock()
    policy = UploadPolicy("all", max_per_minute=60, clock=clock)
    for _ in range(60):
        policy.should_upload(0.5)
    clock.t -= 500
    assert not policy.should_upload(0.5)
    clock.t += 1.0
    assert policy.should_upload(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "some"}, "mode"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold"),
        ({"max_per_minute": 0}, "max_per_minute"),
        ({"max_per_minute": float("inf")}, "max_per_minute"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UploadPolicy(**kwargs)


def test_bad_confidence_is_refused():
    with pytest.raises(ValueError, match="confidence"):
        UploadPolicy("all").should_upload(2.0)
