from __future__ import annotations

import random

import pytest

from edge_agent.backoff import Backoff


def test_seeded_backoff_is_reproducible():
    a = Backoff(rng=random.Random(7))
    b = Backoff(rng=random.Random(7))
    assert [a.next_delay() for _ in range(20)] == [b.next_delay() for _ in range(20)]


def test_no_jitter_doubles_up_to_the_cap():
    b = Backoff(initial=0.5, maximum=5.0, multiplier=2.0, jitter="none")
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_full_jitter_stays_within_the_exponential_envelope():
    b = Backoff(initial=0.5, maximum=8.0, rng=random.Random(1))
    for attempt in range(12):
        cap = min(8.0, 0.5 * 2**attempt)
        delay = b.next_delay()
        assert 0.0 <= delay <= cap


def test_full_jitter_spreads_delays_over_the_whole_range():
    # Synchronised retries are what jitter prevents: draws at the cap must cover [0, cap].
    rng = random.Random(3)
    delays = []
    for _ in range(2000):
        b = Backoff(initial=60.0, maximum=60.0, rng=rng)
        delays.append(b.next_delay())
    assert min(delays) < 3.0 and max(delays) > 57.0
    assert 27.0 < sum(delays) / len(delays) < 33.0


def test_equal_jitter_never_retries_immediately():
    b = Backoff(initial=4.0, maximum=4.0, jitter="equal", rng=random.Random(0))
    assert all(2.0 <= b.next_delay() <= 4.0 for _ in range(200))


def test_many_attempts_do_not_overflow():
    b = Backoff(initial=0.5, maximum=60.0, jitter="none")
    b.attempt = 100_000
    assert b.next_delay() == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": float("nan")},
        {"maximum": 0.1},  # below initial
        {"maximum": float("inf")},
        {"multiplier": 0.5},
        {"jitter": "half"},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)

