"""`tuneloop audit`: the audit log, newest first. On the DuckDB file when no server runs, else
through the server's `GET /v1/admin/audit` with an admin's token."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from tuneloop.remote import call


def _since(text: str) -> datetime:
    """`--since`, checked as the arguments are parsed (a bad one is a usage error)."""
    from tuneloop.feedback.accounts import AuditQueryError, parse_since

    try:
        return parse_since(text)
    except AuditQueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number from 1 up, not {text!r}")
    return value


def _route(args: argparse.Namespace) -> str:
    query: dict[str, Any] = {"limit": args.limit, "actor": args.actor, "action": args.action}
    if args.since is not None:
        query["since"] = args.since.isoformat()
    return "/v1/admin/audit?" + urlencode({k: v for k, v in query.items() if v is not None})


def _cmd_audit(args: argparse.Namespace) -> int:
    def local(store: Any) -> list[dict[str, Any]]:
        from pydantic_core import to_jsonable_python

        from tuneloop.feedback.accounts import audit_log

        rows = audit_log(store, args.limit, actor=args.actor, action=args.action, since=args.since)
        return to_jsonable_python(rows)  # as the server's answer: FastAPI encodes with pydantic

    rows = call(args.data_dir, local, "GET", _route(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':>6}  {'when (UTC)':<21}{'actor':<24}{'action':<20}{'target':<24}detail")
    for row in rows:
        when = datetime.fromisoformat(row["created_at"]).astimezone(UTC)
        detail = json.dumps(row["detail"], separators=(",", ":")) if row["detail"] else ""
        print(
            f"{row['id']:>6}  {when:%Y-%m-%d %H:%M:%S}  {row['actor']:<24}{row['action']:<20}"
            f"{row['target'] or '-':<24}{detail}"
        )
    return 0


def register(command: Callable[..., Any]) -> None:
    """Add `tuneloop audit` (see `tuneloop.cli_loop.register` for `command`)."""
    audit = command(
        "audit",
        "the audit log, newest first: who trained, imported, promoted, changed accounts or "
        "quarantined raters, and when",
        _cmd_audit,
    )
    audit.add_argument("--actor", metavar="NAME", help="only this account's actions")
    audit.add_argument(
        "--action", help="only this action, e.g. promote, account.add, rater.quarantine"
    )
    audit.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="only rows from this ISO date or datetime on (UTC without a zone)",
    )
    audit.add_argument(
        "--limit", type=_positive, default=100, help="at most this many rows (default: %(default)s)"
    )
    audit.add_argument("--json", action="store_true", help="one JSON array")
