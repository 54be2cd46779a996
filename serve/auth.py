"""Who is calling: bearer tokens of accounts (`tuneloop.feedback.accounts`), checked against
memory, and what their role allows.

`Principals` holds every enabled account by the SHA-256 of its token, loaded once at start and
again after each account change made through this server (the only writer of the database while
it runs), so a request costs a hash and a dict lookup, never a database round trip. The routes
take `Depends(principals.require(role))`; the UI signs in with the same accounts, in sessions
tied to the token (`serve.sessions`, `principals.sessions` where the server has a UI).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import Header, HTTPException

from tuneloop.core.records import Account, role_allows
from tuneloop.feedback.accounts import token_sha256

if TYPE_CHECKING:
    from tuneloop.serve.sessions import Sessions


class Principals:
    """`load` gives every enabled account by the SHA-256 of its token: `token_index` of the
    store here, the primary's accounts on a gateway (`serve.gateway_store`)."""

    def __init__(self, load: Callable[[], dict[str, Account]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._by_hash: dict[str, Account] = {}
        self._by_name: dict[str, Account] = {}
        self._first_use: dict[str, Callable[[], None]] = {}
        # The UI's sessions, set by `server.build_app` when it mounts the UI.
        self.sessions: Sessions | None = None
        self.reload()

    def reload(self) -> None:
        """Read the accounts again (after one was added, disabled, or given a new token)."""
        fresh = self._load()
        with self._lock:
            self._by_hash = fresh
            self._by_name = {a.name: a for a in fresh.values()}
        if self.sessions is not None:
            self.sessions.end_invalid()

    def signed_in(self, token: str) -> Account | None:
        """The enabled account this token signs in, if any."""
        if not token:
            return None
        sha = token_sha256(token.strip())
        account = self._by_hash.get(sha)
        if account is not None and self._first_use:
            with self._lock:
                action = self._first_use.pop(sha, None)
            if action is not None:
                action()
        return account

    def when_first_used(self, token: str, action: Callable[[], None]) -> None:
        """Run `action` once, at the first sign-in with `token` (through the API or the UI)."""
        with self._lock:
            self._first_use[token_sha256(token.strip())] = action

    def by_hash(self, sha256: str) -> Account | None:
        """The enabled account whose token has this SHA-256 (a UI session keeps only that)."""
        return self._by_hash.get(sha256)

    def by_name(self, name: str) -> Account | None:
        """An enabled account by name (the UI knows who signed in by name only)."""
        return self._by_name.get(name)

    def require(self, role: str) -> Callable[..., Awaitable[Account]]:
        """A FastAPI dependency: the calling account, which must have at least `role`;
        401 without a valid token, 403 when the role does not allow it."""

        # async: a plain `def` dependency costs every request a hop to a worker thread.
        async def principal(authorization: str = Header("")) -> Account:
            scheme, _, token = authorization.partition(" ")
            account = self.signed_in(token) if scheme.lower() == "bearer" else None
            if account is None:
                raise HTTPException(
                    401,
                    "sign in: send 'Authorization: Bearer <token>' with an account's token "
                    "(`tuneloop users add NAME` makes one)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not role_allows(account.role, role):
                raise HTTPException(403, f"{account.name} is a {account.role}; this needs {role}")
            return account

        return principal
