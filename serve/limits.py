"""Rate limits per account (chat, feedback) and per address (UI sign-in): token buckets in
memory, answered with 429 and `Retry-After` (`RateLimitedError`).

A bucket holds up to `per_minute` requests and refills at `per_minute / 60` a second, so a
client may burst up to the limit and then goes at the limit's pace. Checks are O(1) under one
lock; buckets of callers idle for an hour are dropped when the table grows.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from tuneloop.core.records import Account, Feedback, Ranking, role_allows
from tuneloop.core.settings import LimitSettings
from tuneloop.serve.errors import RateLimitedError

_FORGET_AFTER_S = 3600.0
_TIDY_AT = 10_000


class RateLimiter:
    def __init__(self, per_minute: int, what: str, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.what, self._clock = per_minute, what, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def wait_s(self, key: str, cost: int = 1) -> float:
        """Take `cost` requests for `key` (at most a full bucket): 0.0 when allowed, else the
        seconds until they would be."""
        if self.per_minute <= 0:
            return 0.0
        rate, now = self.per_minute / 60.0, self._clock()
        cost = min(max(cost, 1), self.per_minute)
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                if len(self._buckets) > _TIDY_AT:
                    self._tidy(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / rate

    async def wait_s_async(self, key: str, cost: int = 1) -> float:
        """`wait_s` from the event loop: the same here; a limiter that asks another server
        (a gateway's, `serve.gateway_store.SharedLimiter`) does it off the loop."""
        return self.wait_s(key, cost)

    def refusal(self, key: str, wait: float) -> RateLimitedError:
        """The error for `key`, `wait` seconds short of a request."""
        return RateLimitedError(
            f"{key} is over the limit of {self.per_minute} {self.what} a minute; "
            f"try again in {math.ceil(wait)} s",
            math.ceil(wait),
        )

    def _tidy(self, now: float) -> None:
        idle = [k for k, (_, last) in self._buckets.items() if now - last > _FORGET_AFTER_S]
        for key in idle:
            del self._buckets[key]


class Limits:
    """The per-account limits of one server, shared by the API and the UI: answers and feedback
    rows a minute for users and raters; operators and admins are not limited. A gateway asks
    the primary's own bucket for each answer (`serve.gateway_store.SharedLimiter`); the primary
    counts the feedback a gateway sends as it commits it (`serve.gateway_api`)."""

    def __init__(self, chat: RateLimiter, feedback: RateLimiter, logins: RateLimiter) -> None:
        self.chat, self.feedback, self.logins = chat, feedback, logins

    @classmethod
    def of(cls, settings: LimitSettings) -> Limits:
        return cls(
            RateLimiter(settings.chats_per_minute, "answers"),
            RateLimiter(settings.feedback_per_minute, "feedback rows"),
            RateLimiter(settings.logins_per_minute, "sign-in attempts"),
        )

    @staticmethod
    def take(limiter: RateLimiter, account: Account, cost: int = 1) -> None:
        """Take `cost` requests of `account` from `limiter`, or raise its `RateLimitedError`;
        operators and admins pass."""
        wait = Limits.wait_s(limiter, account, cost)
        if wait > 0:
            raise limiter.refusal(account.name, wait)

    @staticmethod
    def wait_s(limiter: RateLimiter, account: Account, cost: int = 1) -> float:
        """Take `cost` requests of `account` from `limiter`: 0.0, or the seconds to wait."""
        if role_allows(account.role, "operator"):
            return 0.0
        return limiter.wait_s(account.name, cost)

    @staticmethod
    async def check(limiter: RateLimiter, account: Account, cost: int = 1) -> None:
        """`take` from the event loop (a gateway's limiter asks the primary off the loop)."""
        if not role_allows(account.role, "operator"):
            wait = await limiter.wait_s_async(account.name, cost)
            if wait > 0:
                raise limiter.refusal(account.name, wait)


def feedback_cost(fb: Feedback) -> int:
    """What one feedback row counts against the feedback limit: the preference pairs it makes
    (a k-way ranking is k(k-1)/2 of them, as training sees it), at least 1."""
    return ranking_cost(len(fb.response_ids)) if isinstance(fb, Ranking) else 1


def ranking_cost(answers: int) -> int:
    """`feedback_cost` of a ranking of `answers` answers (0: a vote that is no ranking)."""
    return max(1, answers * (answers - 1) // 2)
