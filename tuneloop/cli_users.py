"""`tuneloop users`: accounts and their roles. On the DuckDB file when no server runs (whoever
may open the file is its owner: the audit log names them `local:<login>`), else through the
server's `/v1/admin/users` routes with an admin's token."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from tuneloop.core.records import ACCOUNT_ROLES, to_json_dict
from tuneloop.remote import call, local_actor


def _call(
    args: argparse.Namespace,
    local: Callable[[Any], Any],
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
) -> Any:
    from tuneloop.feedback.accounts import AccountError

    return call(args.data_dir, local, method, route, body, refused=(AccountError,))


def _cmd_add(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from tuneloop.feedback.accounts import add_account

        account, token = add_account(store, args.name, args.role, actor=local_actor())
        return {**to_json_dict(account), "token": token}

    made = _call(args, local, "POST", "/v1/admin/users", {"name": args.name, "role": args.role})
    print(f"added {made['name']} ({made['role']}); its token, shown this once:")
    print(made["token"])
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    def local(store: Any) -> list[dict[str, Any]]:
        from tuneloop.feedback.accounts import list_accounts

        return [to_json_dict(a) for a in list_accounts(store)]

    found = _call(args, local, "GET", "/v1/admin/users")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'name':<24}{'role':<10}{'state':<10}created")
    for a in found:
        state = "disabled" if a["disabled"] else "active"
        print(f"{a['name']:<24}{a['role']:<10}{state:<10}{a['created_at'] or ''}")
    return 0


def _change(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        def local(store: Any) -> dict[str, Any]:
            from tuneloop.feedback import accounts

            actor = local_actor()
            if action == "token":
                return {
                    "name": args.name,
                    "token": accounts.rotate_token(store, args.name, actor=actor),
                }
            if action == "role":
                return to_json_dict(accounts.set_role(store, args.name, args.role, actor=actor))
            if action in ("trust", "distrust"):
                trusted = action == "trust"
                return to_json_dict(accounts.set_trusted(store, args.name, trusted, actor=actor))
            changed = accounts.set_disabled(store, args.name, action == "disable", actor=actor)
            return to_json_dict(changed)

        body = {"role": args.role} if action == "role" else {}
        result = _call(args, local, "POST", f"/v1/admin/users/{args.name}/{action}", body)
        if action == "token":
            print(f"a new token for {args.name} (the old one no longer works), shown this once:")
            print(result["token"])
        else:
            state = "disabled" if result["disabled"] else "active"
            trusted = ", trusted" if result["trusted"] else ""
            print(f"{result['name']}: {result['role']}, {state}{trusted}")
        return 0

    return run


def _cmd_forget(args: argparse.Namespace) -> int:
    def local(store: Any) -> dict[str, Any]:
        from dataclasses import asdict

        from tuneloop.feedback.forget import forget

        return asdict(forget(store, args.name, actor=local_actor()))

    done = _call(args, local, "POST", f"/v1/admin/users/{args.name}/forget")
    print(json.dumps(done, indent=2))
    return 0


def register(command: Callable[..., Any]) -> None:
    """Add `tuneloop users` and its actions (see `tuneloop.cli_loop.register` for `command`)."""
    users = command(
        "users", "accounts: who may chat, rate, operate and administer", None, group=True
    )
    sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = command("add", "add an account and print its token", _cmd_add, parent=sub)
    add.add_argument("name")
    add.add_argument(
        "--role",
        choices=ACCOUNT_ROLES,
        default="user",
        help="user (chats, judges its own answers), rater (judges anyone's), "
        "operator (trains, promotes), admin (accounts); default: %(default)s",
    )
    listing = command("list", "the accounts, their roles and states", _cmd_list, parent=sub)
    listing.add_argument("--json", action="store_true")
    for action, help_text in (
        ("disable", "disable an account: its token stops working at once"),
        ("enable", "enable a disabled account again"),
        ("token", "give an account a new token (the old one stops working) and print it"),
        ("trust", "trust a user's edits as training targets (raters' always are)"),
        ("distrust", "stop training on a user's edits"),
    ):
        command(action, help_text, _change(action), parent=sub).add_argument("name")
    forget = command(
        "forget",
        "delete a person's conversations, answers and feedback from the database and every "
        "snapshot, and their account; mark the model versions trained on them",
        _cmd_forget,
        parent=sub,
    )
    forget.add_argument("name")
    role = command("role", "change an account's role", _change("role"), parent=sub)
    role.add_argument("name")
    role.add_argument("role", choices=ACCOUNT_ROLES)
