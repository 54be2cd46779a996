"""The audit log: its filters (actor, action, since), `tuneloop audit` on the database file, and
the rows the loop's commands write when they run on the file without a server (by
`local:<login>`, with the server's action names and detail fields)."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tuneloop import cli
from tuneloop.core.config import DataDir
from tuneloop.feedback import accounts
from tuneloop.feedback.accounts import AuditQueryError, parse_since
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.admin import train_request

LOCAL = f"local:{getpass.getuser()}"
# (actor, action, target, detail, created_at): ids 1 to 5, oldest first.
ROWS = [
    ("admin", "account.add", "otto", {"role": "operator"}, "2026-03-01T09:00:00+00:00"),
    ("otto", "promote", "policy-v2", {"force": False}, "2026-03-02T10:00:00+00:00"),
    ("tuneloop", "rater.quarantine", "rnd", {"reason": "random"}, "2026-03-03T00:00:00+00:00"),
    ("otto", "rollback", "policy-v1", {}, "2026-03-03T12:30:00+00:00"),
    ("admin", "promote", "policy-v3", {"force": True}, "2026-03-04T08:00:00+00:00"),
]


# --- helpers --------------------------------------------------------------------------------------


def write_rows(store: FeedbackStore) -> None:
    """`ROWS` in the audit log, each at its own time."""
    for actor, action, target, detail, _ in ROWS:
        accounts.audit(store, actor, action, target, **detail)
    for row_id, (*_, when) in enumerate(ROWS, start=1):
        store.write(
            lambda con, i=row_id, w=when: con.execute(
                "UPDATE audit_log SET created_at = ? WHERE id = ?", [datetime.fromisoformat(w), i]
            )
        )


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rows]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`tuneloop ARGS` in this process; its stdout (asserting exit status 0)."""
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def logged(root: Path) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """The data dir's audit log, newest first, without the times."""
    with FeedbackStore(DataDir(root).db) as store:
        log = accounts.audit_log(store)
    return [(r["actor"], r["action"], r["target"], r["detail"]) for r in log]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _passive_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cli.main` sets it by default; set here, so the test process's environment is restored.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "f.duckdb") as s:
        write_rows(s)
        yield s


@pytest.fixture
def two_policies(tmp_path: Path) -> Path:
    """A data dir whose registry served policy-v1, then policy-v2 (checkpoint dirs the registry
    only names: promoting without a server loads no model)."""
    root = tmp_path / "data"
    with FeedbackStore(DataDir(root).db) as store:
        for name in ("model-a", "model-b"):
            (tmp_path / name).mkdir()
            ensure_served_policy(store, str(tmp_path / name), str, reason="served by the test")
    return root


# --- the filters ----------------------------------------------------------------------------------


def test_the_log_is_filtered_by_actor_action_and_since(store: FeedbackStore) -> None:
    assert ids(accounts.audit_log(store)) == [5, 4, 3, 2, 1]
    assert ids(accounts.audit_log(store, actor="otto")) == [4, 2]
    assert ids(accounts.audit_log(store, action="promote")) == [5, 2]
    assert ids(accounts.audit_log(store, actor="otto", action="promote")) == [2]
    assert ids(accounts.audit_log(store, action="rater.quarantine")) == [3]
    assert accounts.audit_log(store, actor="nobody") == []
    # `since` counts a row made at that very time (row 3, at midnight).
    assert ids(accounts.audit_log(store, since=parse_since("2026-03-03"))) == [5, 4, 3]
    assert ids(accounts.audit_log(store, since=parse_since("2026-03-03T00:00:01"))) == [5, 4]
    assert ids(accounts.audit_log(store, since=parse_since("2026-03-03T14:30+02:00"))) == [5, 4]
    assert ids(accounts.audit_log(store, since=parse_since("2026-03-03T14:31+02:00"))) == [5]
    assert ids(accounts.audit_log(store, actor="admin", since=parse_since("2026-03-02"))) == [5]
    assert ids(accounts.audit_log(store, 1, action="promote")) == [5]

    [row] = accounts.audit_log(store, actor="otto", action="promote")
    assert (row["actor"], row["action"], row["target"]) == ("otto", "promote", "policy-v2")
    assert row["detail"] == {"force": False}
    assert row["created_at"] == datetime(2026, 3, 2, 10, tzinfo=UTC)


def test_since_is_an_iso_date_or_datetime_utc_without_a_zone() -> None:
    assert parse_since("2026-03-03") == datetime(2026, 3, 3, tzinfo=UTC)
    assert parse_since(" 2026-03-03T12:30 ") == datetime(2026, 3, 3, 12, 30, tzinfo=UTC)
    assert parse_since("2026-03-03T12:30:00Z") == datetime(2026, 3, 3, 12, 30, tzinfo=UTC)
    plus_two = parse_since("2026-03-03T14:30+02:00")
    assert plus_two.utcoffset() == timedelta(hours=2)
    assert plus_two == datetime(2026, 3, 3, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    for bad in ("yesterday", "2026-13-01", "03/03/2026", ""):
        with pytest.raises(AuditQueryError, match=f"not an ISO date or datetime: {bad!r}"):
            parse_since(bad)


# --- `tuneloop audit` on the file -----------------------------------------------------------------


def test_audit_command_on_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    dd = ["--data-dir", str(root)]
    with FeedbackStore(DataDir(root).db) as store:
        write_rows(store)
    run_cli(capsys, "users", "add", "bob", "--role", "operator", *dd)  # row 6, by LOCAL

    listed = json.loads(run_cli(capsys, "audit", "--json", *dd))
    assert [(r["id"], r["actor"], r["action"], r["target"], r["detail"]) for r in listed] == [
        (6, LOCAL, "account.add", "bob", {"role": "operator"}),
        *[(i, *ROWS[i - 1][:4]) for i in (5, 4, 3, 2, 1)],
    ]
    assert [r["created_at"] for r in listed[1:]] == [
        "2026-03-04T08:00:00Z",
        "2026-03-03T12:30:00Z",
        "2026-03-03T00:00:00Z",
        "2026-03-02T10:00:00Z",
        "2026-03-01T09:00:00Z",
    ]
    assert set(listed[0]) == {"id", "actor", "action", "target", "detail", "created_at"}

    def audit_ids(*args: str) -> list[int]:
        return ids(json.loads(run_cli(capsys, "audit", "--json", *args, *dd)))

    assert audit_ids("--actor", LOCAL) == [6]
    assert audit_ids("--action", "promote") == [5, 2]
    assert audit_ids("--actor", "otto", "--since", "2026-03-03") == [4]
    assert audit_ids("--since", "2026-03-03T14:30+02:00", "--limit", "2") == [6, 5]
    assert audit_ids("--since", "2999-01-01") == []

    table = run_cli(capsys, "audit", "--action", "promote", *dd).splitlines()
    assert table[0].split() == ["id", "when", "(UTC)", "actor", "action", "target", "detail"]
    assert [line.split() for line in table[1:]] == [
        ["5", "2026-03-04", "08:00:00", "admin", "promote", "policy-v3", '{"force":true}'],
        ["2", "2026-03-02", "10:00:00", "otto", "promote", "policy-v2", '{"force":false}'],
    ]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--since", "yesterday", "argument --since: not an ISO date or datetime: 'yesterday'"),
        ("--limit", "0", "argument --limit: a whole number from 1 up, not '0'"),
    ],
)
def test_bad_audit_arguments_are_refused_with_the_reason(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["audit", option, value, "--data-dir", str(tmp_path / "data")])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before the database was opened


# --- the loop's commands without a server ---------------------------------------------------------


def test_promote_and_rollback_on_the_file_are_audited(
    two_policies: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dd = ["--data-dir", str(two_policies)]
    run_cli(capsys, "promote", "policy-v1", *dd)
    run_cli(capsys, "rollback", *dd)  # policy-v1 is rejected
    run_cli(capsys, "promote", "policy-v1", "--force", *dd)
    assert logged(two_policies) == [
        (LOCAL, "promote", "policy-v1", {"force": True}),
        (LOCAL, "rollback", "policy-v2", {}),
        (LOCAL, "promote", "policy-v1", {"force": False}),
    ]


def test_snapshot_on_the_file_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    snap = json.loads(run_cli(capsys, "snapshot", "--data-dir", str(root)))
    assert logged(root) == [(LOCAL, "snapshot", snap["id"], {})]


def test_data_import_on_the_file_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Sets?", "chosen": "Unordered, unique.", "rejected": "No idea."},
        {"prompt": "Lists?", "chosen": "Ordered.", "rejected": "Maybe."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "data"

    result = json.loads(run_cli(capsys, "data", "import", str(pairs), "--data-dir", str(root)))
    [(actor, action, target, detail)] = logged(root)
    assert (actor, action, target) == (LOCAL, "import", str(pairs.resolve()))
    assert detail == {
        "pairs": 2,
        "responses": 4,
        "skipped": 1,
        "skip_reasons": {"identical answers": 1},
        "seconds": result["seconds"],
    }


def test_train_on_the_file_is_audited_as_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As through a server, the row records the cycle asked for, before it runs: here one that
    finds nothing to train on (which makes it cheap)."""
    model = tmp_path / "model"
    model.mkdir()
    root = tmp_path / "data"
    args = ["train", "dpo", "--model", str(model), "--set", "max_steps=2", "--min-win-rate", "0"]
    with pytest.raises(SystemExit, match="no preference pairs in the train split"):
        cli.main([*args, "--data-dir", str(root)])

    [(actor, action, target, detail)] = logged(root)
    assert (actor, action, target) == (LOCAL, "train", "dpo")
    assert set(detail) == set(train_request().model_fields)  # the server's request fields
    assert (detail["kind"], detail["overrides"], detail["min_win_rate"]) == (
        "dpo",
        ["max_steps=2"],
        0.0,
    )
    assert (detail["gate"], detail["keep_reward"], detail["config_file"]) == (True, False, None)
