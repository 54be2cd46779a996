"""Token buckets: a burst up to the limit, then the limit's pace; a 429 says when to retry."""

from __future__ import annotations

import asyncio

import pytest

from tuneloop.core.records import Account
from tuneloop.serve.errors import RateLimitedError, status_of
from tuneloop.serve.limits import Limits, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_up_to_the_limit_then_one_request_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(60, "rows", clock)  # one a second once the burst is spent
    assert [limiter.wait_s("ann") for _ in range(60)] == [0.0] * 60
    assert limiter.wait_s("ann") == pytest.approx(1.0)
    assert limiter.wait_s("ben") == 0.0  # each caller has a bucket of their own
    clock.now = 0.5
    assert limiter.wait_s("ann") == pytest.approx(0.5)
    clock.now = 1.0
    assert limiter.wait_s("ann") == 0.0
    assert limiter.wait_s("ann") == pytest.approx(1.0)
    clock.now = 1000.0  # refilled, never past the limit
    assert sum(limiter.wait_s("ann") == 0.0 for _ in range(100)) == 60


def test_over_the_limit_is_a_429_with_retry_after_and_zero_means_no_limit() -> None:
    clock = Clock()
    limiter = RateLimiter(2, "answers", clock)
    ann, boss = Account("ann", "user"), Account("boss", "operator")

    def check(account: Account) -> None:
        asyncio.run(Limits.check(limiter, account))

    check(ann)
    check(ann)
    for _ in range(10):
        check(boss)  # operators are not limited
    with pytest.raises(RateLimitedError) as refused:
        check(ann)
    assert status_of(refused.value) == 429
    assert refused.value.headers == {"Retry-After": "30"}
    assert "limit of 2 answers a minute" in str(refused.value)
    with pytest.raises(RateLimitedError):
        Limits.take(limiter, ann)  # the same, off the event loop
    Limits.take(limiter, boss)
    unlimited = RateLimiter(0, "answers", clock)
    assert all(unlimited.wait_s("ann") == 0.0 for _ in range(10_000))
