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
from typing import Any

from tuneloop.core.records import Account, role_allows
from tuneloop.core.settings import LimitSettings
from tuneloop.serve.errors import RateLimitedError, error_response

_FORGET_AFTER_S = 3600.0
_TIDY_AT = 10_000


class RateLimiter:
    def __init__(self, per_minute: int, what: str, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.what, self._clock = per_minute, what, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Take one request for `key`: 0.0 when allowed, else the seconds until it would be."""
        if self.per_minute <= 0:
            return 0.0
        rate, now = self.per_minute / 60.0, self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > _TIDY_AT:
                    self._tidy(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate

    async def wait_s_async(self, key: str) -> float:
        """`wait_s` from the event loop: the same here; a limiter that asks another server
        (a gateway's, `serve.gateway_store.SharedLimiter`) does it off the loop."""
        return self.wait_s(key)

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
    def take(limiter: RateLimiter, account: Account) -> None:
        """Take one request of `account` from `limiter`, or raise its `RateLimitedError`;
        operators and admins pass."""
        wait = Limits.wait_s(limiter, account)
        if wait > 0:
            raise limiter.refusal(account.name, wait)

    @staticmethod
    def wait_s(limiter: RateLimiter, account: Account) -> float:
        """Take one request of `account` from `limiter`: 0.0, or the seconds to wait."""
        return 0.0 if role_allows(account.role, "operator") else limiter.wait_s(account.name)

    @staticmethod
    async def check(limiter: RateLimiter, account: Account) -> None:
        """`take` from the event loop (a gateway's limiter asks the primary off the loop)."""
        if not role_allows(account.role, "operator"):
            wait = await limiter.wait_s_async(account.name)
            if wait > 0:
                raise limiter.refusal(account.name, wait)


class LoginLimit:
    """ASGI middleware: at most `limiter.per_minute` sign-in attempts (`POST /login`, Gradio's
    form) per client address; more get a 429 before the password is checked."""

    def __init__(self, app: Any, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") == "/login"
        ):
            address = (scope.get("client") or ("unknown",))[0]
            wait = self.limiter.wait_s(address)
            if wait > 0:
                seconds = str(math.ceil(wait))
                message = f"too many sign-in attempts from {address}; try again in {seconds} s"
                response = error_response(429, message, {"Retry-After": seconds})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
