"""The `tuneloop` command: fast help, and database commands with and without a running server."""

from __future__ import annotations

import argparse
import getpass
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import live_server

from tuneloop.cli import build_parser
from tuneloop.core.config import apply_openmp_defaults
from tuneloop.feedback.store import FeedbackStore


def tuneloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_subcommand_without_heavy_imports() -> None:
    started = time.perf_counter()
    code = (
        "import sys, tuneloop.cli as c\n"
        "c.build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'duckdb') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
    help_text = tuneloop("--help").stdout
    commands = dict(leaf_commands(build_parser()))
    assert len(commands) >= 14
    for name in {path.split()[0] for path in commands}:
        assert f"    {name} " in help_text or f"    {name}\n" in help_text, name
    assert time.perf_counter() - started < 30


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every runnable subcommand ("train", "data import", ...) and its parser."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield prefix.strip(), parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, f"{prefix} {name}")


def test_every_subcommand_takes_data_dir() -> None:
    for name, parser in leaf_commands(build_parser()):
        options = {flag for a in parser._actions for flag in a.option_strings}
        assert "--data-dir" in options, name


def test_commands_open_the_file_when_no_server_runs(tmp_path: Path) -> None:
    dd = tmp_path / "data"
    stats = tuneloop("stats", "--json", "--data-dir", str(dd))
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["thumbs"] == 0
    assert json.loads(tuneloop("versions", "--json", "--data-dir", str(dd)).stdout) == []
    missing = tuneloop("datasets", "--data-dir", str(dd))
    assert missing.returncode != 0 and "run `tuneloop snapshot` first" in missing.stderr


def test_commands_go_through_the_server_that_holds_the_file(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False):
        dd = str(server.data_dir.root)
        # The first admin's token file is gone once the token signed in (below): the CLI takes
        # the token from the environment.
        monkeypatch.setenv("TUNELOOP_TOKEN", server.token)
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            headers=server.auth,
        ).json()
        httpx.post(
            f"{server.url}/v1/feedback",
            json={"kind": "thumbs", "response_id": int(chat["id"]), "value": 1},
            headers=server.auth,
        )
        stats = tuneloop("stats", "--json", "--data-dir", dd)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["thumbs"] == 1
        versions = tuneloop("versions", "--data-dir", dd)
        assert "policy-v1" in versions.stdout and "promoted" in versions.stdout
        snap = tuneloop("snapshot", "--data-dir", dd)
        assert snap.returncode == 0, snap.stderr
        manifest = json.loads(snap.stdout)["manifest"]
        assert manifest["tables"]["thumbs"]["rows"] == 1
        built = tuneloop("datasets", "--data-dir", dd)
        assert built.returncode == 0, built.stderr
        assert "preference" in json.loads(built.stdout)

        added = tuneloop("users", "add", "alice", "--role", "rater", "--data-dir", dd)
        assert added.returncode == 0, added.stderr
        alice = {"Authorization": f"Bearer {added.stdout.split()[-1]}"}
        assert httpx.get(f"{server.url}/v1/models", headers=alice).status_code == 200
        listed = json.loads(tuneloop("users", "list", "--json", "--data-dir", dd).stdout)
        assert [(u["name"], u["role"]) for u in listed] == [("admin", "admin"), ("alice", "rater")]
        assert tuneloop("users", "disable", "alice", "--data-dir", dd).returncode == 0
        assert httpx.get(f"{server.url}/v1/models", headers=alice).status_code == 401
        since = ("--since", "2000-01-01T00:00+00:00")  # a "+" the query string must keep
        audit = tuneloop("audit", "--json", "--actor", "admin", *since, "--data-dir", dd)
        assert audit.returncode == 0, audit.stderr
        assert [(e["action"], e["target"]) for e in json.loads(audit.stdout)] == [
            ("account.disable", "alice"),
            ("account.add", "alice"),
            ("snapshot", json.loads(snap.stdout)["id"]),
        ]
        refused = tuneloop("users", "add", "Bad Name", "--data-dir", dd)
        assert refused.returncode == 1 and "account name" in refused.stderr


def test_users_are_managed_on_the_file_when_no_server_runs(tmp_path: Path) -> None:
    dd = str(tmp_path / "data")
    added = tuneloop("users", "add", "bob", "--role", "operator", "--data-dir", dd)
    assert added.returncode == 0, added.stderr
    assert added.stdout.split()[-1].startswith("tl_")
    assert tuneloop("users", "role", "bob", "rater", "--data-dir", dd).returncode == 0
    token = tuneloop("users", "token", "bob", "--data-dir", dd)
    assert token.returncode == 0 and token.stdout.split()[-1] != added.stdout.split()[-1]
    listed = tuneloop("users", "list", "--data-dir", dd).stdout
    assert "bob" in listed and "rater" in listed and "active" in listed
    with FeedbackStore(Path(dd) / "feedback.duckdb") as store:
        log = store.read("SELECT actor, action FROM audit_log ORDER BY id")
    actor = f"local:{getpass.getuser()}"
    assert log == [
        {"actor": actor, "action": "account.add"},
        {"actor": actor, "action": "account.role"},
        {"actor": actor, "action": "account.token"},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (("up", "--engine", "nope"), "invalid choice"),
        (("up", "--port", "x"), "invalid int value"),
    ],
)
def test_bad_arguments_get_a_clear_error(args: tuple[str, ...], message: str) -> None:
    result = tuneloop(*args)
    assert result.returncode == 2 and message in result.stderr


def test_vllm_engine_without_a_way_to_reach_vllm_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    up = ("up", "--data-dir", str(tmp_path / "d"), "--model", str(tiny_model_dir))
    nothing = tuneloop(*up, "--engine", "vllm")
    assert nothing.returncode != 0
    assert "--engine vllm needs --vllm-python, --vllm-command or --vllm-url" in nothing.stderr
    missing = tuneloop(*up, "--engine", "vllm", "--vllm-python", str(tmp_path / "no-python"))
    assert missing.returncode == 1, missing.stderr
    assert "cannot start vLLM" in missing.stderr and "tuneloop vllm-env" in missing.stderr
    bad_url = tuneloop(*up, "--engine", "vllm", "--vllm-url", "ftp://x")
    assert bad_url.returncode != 0 and "--vllm-url must start with" in bad_url.stderr
    python = ("--engine", "vllm", "--vllm-python", sys.executable)
    not_a_list = tuneloop(*up, *python, "--vllm-cpus", "3-1")
    assert not_a_list.returncode != 0 and "3-1 runs backwards" in not_a_list.stderr
    not_ours = tuneloop(*up, *python, "--vllm-cpus", "100000")
    assert not_ours.returncode != 0 and "this machine has CPUs" in not_ours.stderr
    attached = tuneloop(*up, "--engine", "vllm", "--vllm-url", "unix:/x", "--vllm-cpus", "0")
    assert attached.returncode != 0 and "not --vllm-url" in attached.stderr
    one_list = tuneloop(*up, *python, "--vllm-replicas", "2", "--vllm-cpus", "0")
    assert one_list.returncode != 0 and "one list per replica: 1 given for 2" in one_list.stderr
    shared = tuneloop(*up, *python, "--vllm-replicas", "2", "--vllm-cpus", "0", "0")
    assert shared.returncode != 0 and "CPUs of its own" in shared.stderr


def test_openmp_defaults_fill_only_what_the_environment_leaves_unset() -> None:
    environ = {"OMP_NUM_THREADS": "1"}
    apply_openmp_defaults(environ)
    assert environ == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": ""}  # an operator's choice of OpenMP's own default
    apply_openmp_defaults(environ)
    assert environ == {"OMP_WAIT_POLICY": ""}
