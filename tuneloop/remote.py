"""Reaching the database from the CLI: directly when no server runs, else through the server
that holds the DuckDB file (one read-write process at a time), signed in with `cli_token`."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.core.config import DataDir


class ServerError(RuntimeError):
    """The server holding the database could not be reached, or refused the request; the
    message is the one line the command prints."""


def local_or_server(
    dd: DataDir,
    local: Callable[[Any], Any],
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
) -> Any:
    """Run `local(store)` on the DuckDB file, or ask the server that holds it."""
    from tuneloop.feedback.store import FeedbackStore, StoreLockedError

    try:
        store = FeedbackStore(dd.db)
    except StoreLockedError:
        return ask_server(dd, method, route, body)
    try:
        return local(store)
    finally:
        store.close()


def local_actor() -> str:
    """Who acts on the database file directly: whoever may open it is its owner, and the audit
    log names them by login."""
    return f"local:{getpass.getuser()}"


def audit_locally(store: Any, action: str, target: str | None, **detail: Any) -> None:
    """Record in the audit log an operator's action done on the database file directly, by
    `local_actor()`; through a server, the server records it under the caller's name."""
    from tuneloop.feedback.accounts import audit

    audit(store, local_actor(), action, target, **detail)


def call(
    data_dir: Path,
    local: Callable[[Any], Any],
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    *,
    refused: tuple[type[Exception], ...] = (),
) -> Any:
    """`local_or_server` for a command: the errors in `refused` (what the layers below raise
    for a request that cannot be done, e.g. an unknown account) become its one-line message."""
    try:
        return local_or_server(DataDir(data_dir), local, method, route, body)
    except refused as exc:
        raise ServerError(str(exc).strip("'\"")) from exc


def ask_server(dd: DataDir, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running server's API (admin routes with the data dir's token)."""
    import httpx

    if not dd.server_file.exists():
        raise ServerError(
            f"{dd.db} is locked by another process, and no server is recorded in {dd.server_file}"
        )
    url = json.loads(dd.server_file.read_text())["url"]
    headers = {"Authorization": f"Bearer {cli_token(dd)}"}
    resp = httpx.request(method, url + route, headers=headers, json=body, timeout=600)
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise ServerError(f"the server answered {resp.status_code}: {message}")
    return resp.json()


def stage_file(dd: DataDir, path: Path) -> Path:
    """A copy of `path` in the data dir's inbox (readable by its owner only), for a running
    server to read: it reads no files outside the data dir (README: Security)."""
    dd.inbox.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = dd.inbox / f"{uuid.uuid4().hex[:8]}-{path.name}"
    shutil.copyfile(path, staged)
    os.chmod(staged, 0o600)
    return staged


def cli_token(dd: DataDir) -> str:
    """The token the CLI signs in with: `$TUNELOOP_TOKEN`, else the first admin's while the
    data dir's `admin.token` still holds it (the server removes the file at that token's first
    sign-in)."""
    token = os.environ.get("TUNELOOP_TOKEN", "").strip()
    if token:
        return token
    try:
        return dd.admin_token_file.read_text().strip()
    except OSError as exc:
        raise ServerError(
            "no token to sign in with: set TUNELOOP_TOKEN to an operator's or admin's token "
            f"({dd.admin_token_file} held the first admin's until its first sign-in; the server "
            "printed it in its log at its first start, and with the server stopped, `tuneloop "
            "users token NAME` gives an account a new one)"
        ) from exc


def follow_cycle(
    get: Callable[[str], Any], show: Callable[[str], None], poll_s: float = 1.0
) -> dict[str, Any]:
    """Wait for a server's training cycle to end, showing its running job's progress as it
    changes; returns the cycle's summary. `get(route)` answers a GET of an admin route."""
    shown = ""
    while (loop := get("/v1/admin/loop"))["busy"]:
        runs = get("/v1/admin/runs?limit=1")
        if runs:
            run = runs[0]
            line = f"{run['id']} {run['kind']}: {run['stage']} {run['progress']:.0%}"
            if line != shown:
                show(line)
                shown = line
        time.sleep(poll_s)
    return loop["last_cycle"] or {}
