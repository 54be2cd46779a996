"""Accounts and their tokens, kept in the feedback database, and the audit log of what operators
and admins did.

A token is 32 random bytes (`tl_` + URL-safe base64); the database holds its SHA-256 only, so a
copy of the database signs no one in. The hash needs no salt or slow KDF: the token is random,
not a password a person chose. `token_index` loads every active account once, so that a request
is checked against memory (`serve` keeps one and reloads it after each change), not the
database.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

import duckdb

from tuneloop.core.records import ACCOUNT_ROLES, Account
from tuneloop.feedback.store import FeedbackStore

TOKEN_PREFIX = "tl_"
# The first admin, made on a fresh data dir; its token goes to the data dir's `admin.token`.
FIRST_ADMIN = "admin"
# Rows of these names are made by tuneloop itself, never by a person signing in.
RESERVED_NAMES = frozenset({"anonymous", "import", "system"})
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.@-]{0,63}$")


class AccountError(ValueError):
    """An account change that cannot be made; the message says why."""


class UnknownAccountError(AccountError):
    """No account of that name."""


class AuditQueryError(ValueError):
    """An audit log query that cannot be answered (a `since` that is no date); the message says
    why."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AccountError(
            f"an account name is 1-64 lower-case letters, digits and _ . @ -, starting with a "
            f"letter or digit; got {name[:80]!r}"
        )
    if name in RESERVED_NAMES:
        raise AccountError(f"{name!r} is reserved for rows tuneloop writes itself")
    return name


_ACCOUNT_COLUMNS = "name, role, disabled, created_at, coalesce(trusted, false) AS trusted"


def check_role(role: str) -> str:
    if role not in ACCOUNT_ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ACCOUNT_ROLES)}")
    return role


def add_account(store: FeedbackStore, name: str, role: str, *, actor: str) -> tuple[Account, str]:
    """A new account and its token (shown once: only its hash is kept)."""
    check_name(name)
    check_role(role)
    token = new_token()

    def insert(con: duckdb.DuckDBPyConnection) -> None:
        if con.execute("SELECT 1 FROM accounts WHERE name = ?", [name]).fetchone():
            raise AccountError(f"an account named {name!r} exists already")
        now = datetime.now(UTC)
        con.execute(
            "INSERT INTO accounts (name, role, token_sha256, disabled, created_at, updated_at) "
            "VALUES (?, ?, ?, false, ?, ?)",
            [name, role, token_sha256(token), now, now],
        )
        write_audit(con, actor, "account.add", name, {"role": role})

    store.write(insert)
    return get_account(store, name), token


def list_accounts(store: FeedbackStore) -> list[Account]:
    rows = store.read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name")
    return [Account(**row) for row in rows]


def get_account(store: FeedbackStore, name: str) -> Account:
    rows = store.read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name = ?", [name])
    if not rows:
        raise UnknownAccountError(f"no account named {name!r}")
    return Account(**rows[0])


def set_disabled(store: FeedbackStore, name: str, disabled: bool, *, actor: str) -> Account:
    """Disable an account (its token stops working at once) or enable it again."""
    _update(
        store,
        name,
        "disabled = ?",
        [disabled],
        actor,
        "account.disable" if disabled else "account.enable",
        {},
    )
    return get_account(store, name)


def set_role(store: FeedbackStore, name: str, role: str, *, actor: str) -> Account:
    check_role(role)
    _update(store, name, "role = ?", [role], actor, "account.role", {"role": role})
    return get_account(store, name)


def set_trusted(store: FeedbackStore, name: str, trusted: bool, *, actor: str) -> Account:
    """Trust a user's edits as training targets (`TrustSettings.edits`), or stop."""
    action = "account.trust" if trusted else "account.distrust"
    _update(store, name, "trusted = ?", [trusted], actor, action, {})
    return get_account(store, name)


def rotate_token(store: FeedbackStore, name: str, *, actor: str) -> str:
    """A new token for `name`; the old one stops working."""
    token = new_token()
    _update(store, name, "token_sha256 = ?", [token_sha256(token)], actor, "account.token", {})
    return token


def ensure_first_admin(store: FeedbackStore) -> str | None:
    """On a data dir without any admin: make `FIRST_ADMIN` and return its token; else None."""
    if store.read("SELECT 1 FROM accounts WHERE role = 'admin' LIMIT 1"):
        return None
    if store.read("SELECT 1 FROM accounts WHERE name = ?", [FIRST_ADMIN]):
        set_role(store, FIRST_ADMIN, "admin", actor="system")
        set_disabled(store, FIRST_ADMIN, False, actor="system")
        return rotate_token(store, FIRST_ADMIN, actor="system")
    return add_account(store, FIRST_ADMIN, "admin", actor="system")[1]


def token_index(store: FeedbackStore) -> dict[str, Account]:
    """Every enabled account by the SHA-256 of its token."""
    rows = store.read(f"SELECT token_sha256, {_ACCOUNT_COLUMNS} FROM accounts WHERE NOT disabled")
    return {row.pop("token_sha256"): Account(**row) for row in rows}


def audit(store: FeedbackStore, actor: str, action: str, target: str | None, **detail: Any) -> None:
    """Record an operator's or admin's action."""
    store.write(lambda con: write_audit(con, actor, action, target, detail))


_AUDIT_QUERY = """
    SELECT * FROM audit_log
    WHERE ($actor IS NULL OR actor = $actor)
      AND ($action IS NULL OR action = $action)
      AND ($since IS NULL OR created_at >= $since)
    ORDER BY id DESC
    LIMIT $limit
"""


def audit_log(
    store: FeedbackStore,
    limit: int = 100,
    *,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """Newest first: only `actor`'s rows, only `action`'s, only those made at or after `since`
    (see `parse_since`), where given."""
    params = {"actor": actor, "action": action, "since": since, "limit": limit}
    rows = store.read(_AUDIT_QUERY, params)
    return [row | {"detail": json.loads(row["detail"] or "{}")} for row in rows]


def parse_since(text: str) -> datetime:
    """The start of an audit log query: an ISO date (its midnight) or datetime. One without a
    time zone is UTC, the zone the operator UI shows the log's times in."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AuditQueryError(
            f"not an ISO date or datetime: {text[:80]!r} "
            "(e.g. 2026-05-01, 2026-05-01T14:30 or 2026-05-01T14:30:00+02:00)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _update(
    store: FeedbackStore,
    name: str,
    assignment: str,
    params: list[Any],
    actor: str,
    action: str,
    detail: dict[str, Any],
) -> None:
    def update(con: duckdb.DuckDBPyConnection) -> None:
        if not con.execute("SELECT 1 FROM accounts WHERE name = ?", [name]).fetchone():
            raise UnknownAccountError(f"no account named {name!r}")
        con.execute(
            f"UPDATE accounts SET {assignment}, updated_at = ? WHERE name = ?",
            [*params, datetime.now(UTC), name],
        )
        write_audit(con, actor, action, name, detail)

    store.write(update)


def write_audit(
    con: duckdb.DuckDBPyConnection,  # in the writer's transaction (`FeedbackStore.write`)
    actor: str,
    action: str,
    target: str | None,
    detail: dict[str, Any],
) -> None:
    next_id = con.execute("SELECT coalesce(max(id), 0) + 1 FROM audit_log").fetchone()[0]
    con.execute(
        "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?)",
        [next_id, actor, action, target, json.dumps(detail, default=str), datetime.now(UTC)],
    )
