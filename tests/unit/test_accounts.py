"""Accounts in the feedback database: roles, hashed tokens, disabling, the first admin, and
the audit log of every change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.core.records import role_allows
from tuneloop.feedback import accounts
from tuneloop.feedback.accounts import AccountError, UnknownAccountError, token_sha256
from tuneloop.feedback.store import FeedbackStore


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "f.duckdb") as s:
        yield s


def test_tokens_sign_in_their_account_and_only_their_hash_is_stored(
    store: FeedbackStore, tmp_path: Path
) -> None:
    alice, token = accounts.add_account(store, "alice", "rater", actor="admin")
    assert (alice.name, alice.role, alice.disabled) == ("alice", "rater", False)
    assert token.startswith("tl_") and len(token) > 40
    assert accounts.token_index(store) == {token_sha256(token): alice}
    stored = store.read("SELECT * FROM accounts")
    assert token not in str(stored) and stored[0]["token_sha256"] == token_sha256(token)

    new = accounts.rotate_token(store, "alice", actor="admin")
    assert set(accounts.token_index(store)) == {token_sha256(new)}  # the old one is gone
    accounts.set_disabled(store, "alice", True, actor="admin")
    assert accounts.token_index(store) == {}
    assert accounts.set_disabled(store, "alice", False, actor="admin").disabled is False
    assert accounts.set_role(store, "alice", "operator", actor="admin").role == "operator"

    log = accounts.audit_log(store)
    assert [(e["actor"], e["action"], e["target"]) for e in log] == [
        ("admin", "account.role", "alice"),
        ("admin", "account.enable", "alice"),
        ("admin", "account.disable", "alice"),
        ("admin", "account.token", "alice"),
        ("admin", "account.add", "alice"),
    ]
    assert log[0]["detail"] == {"role": "operator"} and log[-1]["detail"] == {"role": "rater"}


def test_bad_names_roles_and_duplicates_are_refused(store: FeedbackStore) -> None:
    accounts.add_account(store, "bob", "user", actor="admin")
    with pytest.raises(AccountError, match="exists already"):
        accounts.add_account(store, "bob", "rater", actor="admin")
    for name in ("Bob", "", "a b", "x" * 65, "-dash"):
        with pytest.raises(AccountError, match="account name"):
            accounts.add_account(store, name, "user", actor="admin")
    for name in ("anonymous", "import"):
        with pytest.raises(AccountError, match="reserved"):
            accounts.add_account(store, name, "user", actor="admin")
    with pytest.raises(AccountError, match="unknown role 'root'"):
        accounts.add_account(store, "carol", "root", actor="admin")
    with pytest.raises(UnknownAccountError, match="no account named 'zed'"):
        accounts.set_disabled(store, "zed", True, actor="admin")
    assert [a.name for a in accounts.list_accounts(store)] == ["bob"]


def test_the_first_admin_is_made_once(store: FeedbackStore, tmp_path: Path) -> None:
    token = accounts.ensure_first_admin(store)
    assert token and accounts.token_index(store)[token_sha256(token)].role == "admin"
    assert accounts.ensure_first_admin(store) is None
    accounts.set_role(store, "admin", "user", actor="admin")  # no admin left: a new token
    again = accounts.ensure_first_admin(store)
    assert again and again != token
    assert accounts.token_index(store)[token_sha256(again)].role == "admin"


def test_roles_include_the_ones_below() -> None:
    assert role_allows("admin", "operator") and role_allows("operator", "rater")
    assert role_allows("rater", "user") and role_allows("user", "user")
    assert not role_allows("rater", "operator") and not role_allows("user", "rater")
