"""The UI's sign-in and its sessions, tied to the token that signed in.

Gradio's login (`POST /login`, the account's name and token) sets a random session cookie and
keeps cookie -> user name in its app's `tokens` table, so on its own a session would outlive a
new token, a disabled account or a new role. Here `Sessions` is that table (`GradioTokens`): a
sign-in records the cookie with the account's name, the SHA-256 of the token and the role.
Gradio's every lookup (each page, each event, each queue call) checks that the token still
signs in that same enabled account with that same role, and that the session has been neither
idle nor alive too long; every account change (`Principals.reload`) checks all sessions. A
session that fails is ended for good: Gradio no longer knows the cookie and asks for a sign-in,
and `ui_common.signed_in` refuses its events. Sessions live in memory: after a restart every
one signs in again. `/logout` ends them too.

`SignInLimit` counts sign-in attempts per client address and per account name, each against the
sign-in limit, before Gradio checks the password.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from tuneloop.core.records import Account
from tuneloop.feedback.accounts import token_sha256
from tuneloop.serve.asgi_body import read_body, replay
from tuneloop.serve.errors import error_response
from tuneloop.serve.limits import RateLimiter

if TYPE_CHECKING:
    from tuneloop.serve.auth import Principals

# The largest sign-in form read; Gradio's is a name and a token.
MAX_SIGN_IN_FORM = 16 * 1024


@dataclass
class Session:
    name: str
    token_sha256: str
    role: str
    created_at: float
    last_seen: float


# The account a sign-in just checked, for the session Gradio starts next in the same request.
_signing_in: ContextVar[Session | None] = ContextVar("tuneloop_signing_in", default=None)


class Sessions:
    """The UI's sessions by cookie (see the module's docstring). `idle_s`: a session ends this
    long after its last request; `max_s`: this long after its sign-in."""

    def __init__(
        self,
        principals: Principals,
        idle_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._principals = principals
        self.idle_s, self.max_s, self._clock = idle_s, max_s, clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._cookie_names: tuple[str, ...] = ()

    def check_password(self, name: str, token: str) -> bool:
        """Gradio's sign-in (`mount_gradio_app(auth=...)`): the account's name and its token.
        Gradio then starts the session in the same request (`start`)."""
        account = self._principals.signed_in(token)
        if account is None or account.name != name:
            return False
        now = self._clock()
        _signing_in.set(Session(name, token_sha256(token.strip()), account.role, now, now))
        return True

    def start(self, cookie: str, name: str) -> None:
        """Record the cookie Gradio just gave the account that `check_password` let in."""
        session = _signing_in.get()
        _signing_in.set(None)
        if session is None or session.name != name:
            raise RuntimeError(f"a session for {name!r} was started without a sign-in")
        with self._lock:
            self._sessions[cookie] = session
        self.end_invalid()  # sessions never used again go at the next sign-in

    def end_invalid(self) -> None:
        """End every session that is no longer valid: `Principals.reload` calls it after an
        account change, so a session of a disabled account stays ended once it is enabled."""
        with self._lock:
            for cookie in [c for c, s in self._sessions.items() if not self._valid(s)]:
                del self._sessions[cookie]

    def account(self, cookie: str | None) -> Account | None:
        """The account this cookie's session signs in now, or None; a session that is no longer
        valid is ended. Each call is a request of the session (its idle time starts again)."""
        if not cookie:
            return None
        with self._lock:
            session = self._sessions.get(cookie)
            if session is None:
                return None
            account = self._valid(session)
            if account is None:
                del self._sessions[cookie]
                return None
            session.last_seen = self._clock()
            return account

    def _valid(self, session: Session) -> Account | None:
        now = self._clock()
        if now - session.last_seen > self.idle_s or now - session.created_at > self.max_s:
            return None
        account = self._principals.by_hash(session.token_sha256)
        if account is None or (account.name, account.role) != (session.name, session.role):
            return None
        return account

    def account_of(self, request: Any) -> Account | None:
        """`account` for a Gradio event's `gr.Request`, by its session cookie."""
        live = getattr(request, "request", None)  # the HTTP request; None once Gradio pickled it
        cookies = live.cookies if live is not None else request.kwargs.get("cookies", {})
        return self.account(self.cookie_of(cookies))

    def cookie_of(self, cookies: Mapping[str, str]) -> str | None:
        """The session cookie among a request's cookies (Gradio sets it twice, with and without
        `Secure`, under names of its app)."""
        return next((cookies[n] for n in self._cookie_names if cookies.get(n)), None)

    def name_of(self, cookie: str) -> str | None:
        with self._lock:
            session = self._sessions.get(cookie)
        return session.name if session else None

    def cookies(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def end(self, cookie: str) -> None:
        with self._lock:
            self._sessions.pop(cookie, None)

    def install(self, gradio_app: Any) -> None:
        """Become the token table of a Gradio app (`mounted_gradio`)."""
        gradio_app.tokens = GradioTokens(self)
        cookie_id = gradio_app.cookie_id
        self._cookie_names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")


def mounted_gradio(app: Any) -> Any:
    """The Gradio app `gr.mount_gradio_app` mounted in `app`."""
    from gradio.routes import App

    return next(r.app for r in app.routes if isinstance(getattr(r, "app", None), App))


class GradioTokens:
    """Gradio's `App.tokens` (cookie -> user name) as the operations Gradio 6 uses on it, over
    `Sessions`. `get`, which Gradio asks on every request, answers for valid sessions only;
    `[cookie]`, which only its `/logout` uses (after listing `keys()`), names any recorded one."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def get(self, cookie: str | None, default: str | None = None) -> str | None:
        account = self.sessions.account(cookie)
        return account.name if account else default

    def __setitem__(self, cookie: str, name: str) -> None:
        self.sessions.start(cookie, name)

    def __getitem__(self, cookie: str) -> str:
        name = self.sessions.name_of(cookie)
        if name is None:
            raise KeyError(cookie)
        return name

    def __delitem__(self, cookie: str) -> None:
        self.sessions.end(cookie)

    def __contains__(self, cookie: object) -> bool:
        return isinstance(cookie, str) and self.sessions.name_of(cookie) is not None

    def keys(self) -> list[str]:
        return self.sessions.cookies()


class SignInLimit:
    """ASGI middleware: at most `limiter.per_minute` sign-in attempts (`POST /login`, Gradio's
    form) from one client address, and as many for one account name from any number of
    addresses; more get a 429 before the password is checked. The address is the one
    `web_security.WebGuard` resolved (`X-Forwarded-For` counts only from a trusted proxy)."""

    def __init__(self, app: Any, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") == "/login"
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, MAX_SIGN_IN_FORM)
        except ClientDisconnect:
            return  # nobody to answer
        if body is None:
            await error_response(413, "a sign-in form is a name and a token")(scope, receive, send)
            return
        name = await _form_username(scope, body)
        address = (scope.get("client") or ("unknown",))[0]
        buckets = ((f"address {address}", f"from {address}"), (f"name {name}", f"for {name!r}"))
        for key, who in buckets:
            wait = self.limiter.wait_s(key)
            if wait > 0:
                seconds = str(math.ceil(wait))
                message = f"too many sign-in attempts {who}; try again in {seconds} s"
                response = error_response(429, message, {"Retry-After": seconds})
                await response(scope, receive, send)
                return
        await self.app(scope, replay(body, receive), send)


async def _form_username(scope: Any, body: bytes) -> str:
    """The `username` field of a sign-in form (URL-encoded or multipart, as Gradio's page
    sends it); "" when there is none."""
    try:
        form = await Request(scope, replay(body, _no_more)).form()
    except (MultiPartException, ValueError, KeyError):
        return ""
    name = form.get("username")
    return name.strip() if isinstance(name, str) else ""


async def _no_more() -> dict[str, Any]:
    return {"type": "http.disconnect"}
