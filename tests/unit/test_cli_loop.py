"""The loop's subcommands (`data import`, `train`, `eval rm`, `versions`, `runs`, `promote`,
`rollback`) on a data dir with a served policy: in-process without a server, and as `tuneloop`
processes that go through the API of a server holding the data dir."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from live_server import live_server

from tuneloop import cli
from tuneloop.core.config import DataDir
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore

TOPICS = ("lists", "tuples", "dicts", "sets", "strings", "files", "loops", "classes")
# TRL's conversational preference format; every chosen answer says "Certainly".
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}: what about {topic}?"}],
        "chosen": [{"role": "assistant", "content": f"Certainly, {topic} are useful here."}],
        "rejected": [{"role": "assistant", "content": f"No idea about {topic} at all."}],
    }
    for i, topic in enumerate(TOPICS * 3)
]
SAME_ANSWERS = {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}  # skipped on import


# --- helpers --------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`tuneloop ARGS` in this process; its stdout (asserting exit status 0)."""
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    return json.loads(run_cli(capsys, *args))


def tuneloop(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`tuneloop ARGS` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clear_error(
    result: subprocess.CompletedProcess[str], *needles: str, only_line: bool = True
) -> None:
    """Failed with a `tuneloop: ...` message as its last (or `only_line`) line, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("tuneloop: "), result.stderr
    assert len(lines) == 1 or not only_line, result.stderr
    for needle in needles:
        assert needle in lines[-1]


def write_pairs(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rows}


def statuses(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["id"]: r["status"] for r in rows}


def served_by_registry(dd: Path) -> list[str]:
    with duckdb.connect(str(DataDir(dd).db), read_only=True) as con:
        rows = con.execute(
            "SELECT id FROM model_versions WHERE kind = 'policy' AND status = 'promoted'"
        ).fetchall()
    return [r[0] for r in rows]


def health(url: str) -> str:
    return httpx.get(f"{url}/health", timeout=30).json()["model_version"]


def prepare(root: Path, *models: Path) -> Path:
    """A data dir whose registry served `models` in turn: the last one is promoted."""
    dd = DataDir(root)
    store = FeedbackStore(dd.db)
    try:
        for model in models:
            ensure_served_policy(store, str(model), str, reason="served by the test")
    finally:
        store.close()
    return root


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _passive_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cli.main` sets it by default; set here, so the test process's environment is restored.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def one_policy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """policy-v1 (the tiny model) served."""
    return prepare(tmp_path / "data", tiny_model_dir)


@pytest.fixture
def two_policies(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path) -> Path:
    """policy-v1 (seed 1) retired, policy-v2 (seed 0) served."""
    return prepare(tmp_path / "data", tiny_model_dir_b, tiny_model_dir)


# --- without a server -----------------------------------------------------------------------------


@pytest.mark.slow
def test_import_train_eval_and_promote_without_a_server(
    one_policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dd = ["--data-dir", str(one_policy)]
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", [*PAIRS, SAME_ANSWERS])

    imported = run_json(capsys, "data", "import", str(pairs_file), *dd)
    assert imported["pairs"] == len(PAIRS) and imported["responses"] == 2 * len(PAIRS)
    assert imported["skipped"] == 1 and imported["skip_reasons"] == {"identical answers": 1}
    stats = run_json(capsys, "stats", "--json", *dd)
    assert stats["comparison"] == len(PAIRS)
    with duckdb.connect(str(DataDir(one_policy).db), read_only=True) as con:
        winners = con.execute(
            "SELECT c.winner, a.text FROM comparisons c JOIN responses a ON a.id = c.response_a"
        ).fetchall()
    assert len(winners) == len(PAIRS)
    assert all(w == "a" and text.startswith("Certainly") for w, text in winners)

    # A reward model alone: trained, registered and promoted (the gate is for policies).
    rm = run_json(capsys, "train", "rm", "--set", "max_steps=4", *dd)
    assert rm["reward_version"] == "reward-v1" and rm["promoted"] is True
    assert rm["candidate_version"] is None
    evaluated = run_json(capsys, "eval", "rm", "--data", str(pairs_file), "--json", *dd)
    assert evaluated["version"] == "reward-v1" and evaluated["pairs"] == len(PAIRS)
    assert 0.0 <= evaluated["accuracy"] <= 1.0 and math.isfinite(evaluated["margin"])
    half_wins = 2 * evaluated["accuracy"] * len(PAIRS)  # a tie counts half a win
    assert abs(half_wins - round(half_wins)) < 1e-9
    text = run_cli(capsys, "eval", "rm", "--data", str(pairs_file), *dd)
    assert text.startswith("reward-v1: accuracy ") and f"on {len(PAIRS)} pairs" in text

    # DPO with a bar of 0, gated by the reward model just trained: promoted.
    dpo = run_json(
        capsys,
        "train",
        "dpo",
        "--set",
        "max_steps=4",
        "--min-win-rate",
        "0",
        "--keep-reward",
        "--gate-prompts",
        "8",
        "--gate-max-tokens",
        "16",
        *dd,
    )
    assert (dpo["candidate_version"], dpo["reward_version"]) == ("policy-v2", "reward-v1")
    assert dpo["promoted"] is True and "clears the bar 0.00" in dpo["reason"]
    assert dpo["gate"]["reason"] == dpo["reason"] and dpo["gate"]["prompts"] == 8

    versions = by_id(run_json(capsys, "versions", "--json", *dd))
    assert statuses(list(versions.values())) == {
        "policy-v1": "retired",
        "policy-v2": "promoted",
        "reward-v1": "promoted",
    }
    candidate = versions["policy-v2"]
    assert candidate["parent"] == "policy-v1" and candidate["snapshot_id"] == dpo["snapshot_id"]
    assert candidate["metrics"]["feedback_rows"]["comparison"] == len(PAIRS)
    assert candidate["metrics"]["gate"]["win_rate"] == dpo["gate"]["win_rate"]
    table = run_cli(capsys, "versions", *dd)
    assert "policy-v2" in table and "promoted" in table

    runs = run_json(capsys, "runs", "--json", *dd)
    assert [r["kind"] for r in runs] == ["gate", "dpo", "rm"]  # newest first
    for run in runs:
        assert (run["status"], run["progress"], run["error"]) == ("done", 1.0, None), run
        assert run["trigger"] == "cli"
    assert [r["version_id"] for r in runs] == ["policy-v2", "policy-v2", "reward-v1"]
    assert runs[1]["config"]["overrides"] == {"max_steps": 4}
    table = run_cli(capsys, "runs", *dd)
    assert table.splitlines()[0].split() == ["id", "kind", "status", "progress", "version", "error"]
    assert len(table.splitlines()) == 4 and "100%" in table


def test_promote_and_rollback_without_a_server(
    two_policies: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dd = ["--data-dir", str(two_policies)]
    assert served_by_registry(two_policies) == ["policy-v2"]

    out = run_cli(capsys, "promote", "policy-v1", *dd)
    assert out.startswith("promoted policy-v1 (")
    assert served_by_registry(two_policies) == ["policy-v1"]
    out = run_cli(capsys, "rollback", "--reason", "v1 was worse", *dd)
    assert out.startswith("rolled back to policy-v2 (")
    assert served_by_registry(two_policies) == ["policy-v2"]

    versions = by_id(run_json(capsys, "versions", "--json", *dd))
    assert statuses(list(versions.values())) == {"policy-v1": "rejected", "policy-v2": "promoted"}
    assert versions["policy-v2"]["status_reason"] == "v1 was worse"
    assert run_json(capsys, "runs", "--json", *dd) == []
    with duckdb.connect(str(DataDir(two_policies).db), read_only=True) as con:
        actions = con.execute("SELECT version_id, action FROM promotions ORDER BY id").fetchall()
    assert actions[-2:] == [("policy-v1", "promote"), ("policy-v2", "rollback")]


def test_registry_errors_are_one_clear_line(two_policies: Path) -> None:
    dd = ["--data-dir", str(two_policies)]
    clear_error(tuneloop("promote", "policy-v9", *dd), "unknown model version 'policy-v9'")
    clear_error(tuneloop("promote", "policy-v2", *dd), "already the promoted policy")
    assert tuneloop("rollback", *dd).returncode == 0  # back to policy-v1; v2 is rejected
    clear_error(tuneloop("rollback", *dd), "no earlier policy version to roll back to")
    assert served_by_registry(two_policies) == ["policy-v1"]
    clear_error(
        tuneloop("eval", "rm", "--data", "pairs.jsonl", *dd),
        "no reward model yet; run `tuneloop train rm` first",
    )


@pytest.mark.parametrize(
    "case", ["malformed import", "missing import", "train without feedback", "missing model"]
)
def test_user_errors_of_data_and_train_are_one_clear_line(
    case: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "only one side"}\n')
    dd = ["--data-dir", str(tmp_path / "data")]
    args, needle = {
        "malformed import": (("data", "import", str(bad)), "bad.jsonl line 1: missing key"),
        "missing import": (("data", "import", str(tmp_path / "missing.jsonl")), "missing.jsonl"),
        "train without feedback": (
            ("train", "dpo", "--model", str(tiny_model_dir)),
            "no preference pairs in the train split: collect comparisons or thumbs first",
        ),
        "missing model": (
            ("train", "dpo", "--model", str(tmp_path / "nowhere")),
            "no model directory at",
        ),
    }[case]
    # `train` logs its steps on stderr before the error.
    clear_error(tuneloop(*args, *dd), needle, only_line=case != "train without feedback")


def test_train_on_a_fresh_data_dir_registers_its_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    dd = ["--data-dir", str(tmp_path / "data")]
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    imported = tuneloop("data", "import", str(pairs), "--model", str(tiny_model_dir), *dd)
    assert imported.returncode == 0, imported.stderr
    versions = json.loads(tuneloop("versions", "--json", *dd).stdout)
    assert [(v["id"], v["status"], v["artifact_path"]) for v in versions] == [
        ("policy-v1", "promoted", str(tiny_model_dir.resolve()))
    ]
    trained = tuneloop("train", "rm", "--set", "max_steps=2", *dd)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.splitlines()[-1])["reward_version"] == "reward-v1"


# --- through a running server ---------------------------------------------------------------------


@pytest.mark.slow
def test_commands_go_through_a_running_server(
    two_policies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    for server in live_server(two_policies, None, ui=False):
        dd = ["--data-dir", str(two_policies)]
        # The first admin's token file goes at the token's first sign-in (the first command).
        monkeypatch.setenv("TUNELOOP_TOKEN", server.token)
        assert health(server.url) == "policy-v2"

        promoted = tuneloop("promote", "policy-v1", *dd)
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.startswith("promoted policy-v1 (")
        assert health(server.url) == "policy-v1"  # hot-swapped by the server
        rolled = tuneloop("rollback", *dd)
        assert rolled.returncode == 0, rolled.stderr
        assert rolled.stdout.startswith("rolled back to policy-v2 (")
        assert health(server.url) == "policy-v2"

        unknown = tuneloop("promote", "policy-v9", *dd)
        clear_error(unknown, "the server answered 404", "policy-v9")
        clear_error(tuneloop("rollback", *dd), "the server answered 409", "no earlier policy")
        assert health(server.url) == "policy-v2"

        imported = tuneloop("data", "import", str(pairs_file), *dd)
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["pairs"] == len(PAIRS)
        trained = tuneloop("train", "rm", "--set", "max_steps=4", *dd)
        assert trained.returncode == 0, trained.stderr
        assert "the server started a rm cycle" in trained.stderr
        cycle = json.loads(trained.stdout.splitlines()[-1])
        assert cycle["status"] == "done" and cycle["reward_version"] == "reward-v1"
        assert cycle["trigger"] == "operator"

        runs = tuneloop("runs", "--json", *dd)
        assert runs.returncode == 0, runs.stderr
        [run] = json.loads(runs.stdout)
        assert (run["kind"], run["status"], run["progress"]) == ("rm", "done", 1.0)
        assert run["version_id"] == "reward-v1"
        versions = tuneloop("versions", "--json", *dd)
        assert statuses(json.loads(versions.stdout)) == {
            "policy-v1": "rejected",
            "policy-v2": "promoted",
            "reward-v1": "promoted",
        }
        evaluated = tuneloop("eval", "rm", "--data", str(pairs_file), "--json", *dd)
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["version"] == "reward-v1"
        assert health(server.url) == "policy-v2"
