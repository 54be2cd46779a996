"""Who may do what, on a real server (127.0.0.1): accounts and their tokens, feedback bound to
the caller, answers only their owners (or raters) may judge, operator and admin routes."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    yield from live_server(tmp_path_factory.mktemp("auth") / "data", tiny_model_dir, ui=False)


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, dict[str, str]]:
    """Headers of a user, a second user, a rater and an operator."""
    return {
        name: server.account(name, role)
        for name, role in (
            ("ann", "user"),
            ("ben", "user"),
            ("rae", "rater"),
            ("otto", "operator"),
        )
    }


def chat(server: LiveServer, headers: dict[str, str], **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "What is a set?"}], "max_tokens": 4}
    return httpx.post(
        f"{server.url}/v1/chat/completions", json=body | extra, headers=headers, timeout=60
    )


def feedback(server: LiveServer, headers: dict[str, str], body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/feedback", json=body, headers=headers, timeout=30)


def db_rows(server: LiveServer, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(sql, params or []).fetchall()


def test_without_a_valid_token_nothing_is_answered_or_stored(server: LiveServer) -> None:
    before = db_rows(server, "SELECT count(*) FROM responses")
    for headers in ({}, {"Authorization": "Bearer tl_not-a-token"}, {"Authorization": "Basic x"}):
        assert chat(server, headers).status_code == 401
        refused = feedback(server, headers, {"kind": "thumbs", "response_id": 1, "value": 1})
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "tuneloop users add" in refused.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    assert db_rows(server, "SELECT count(*) FROM responses") == before
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_rows_carry_the_caller_and_no_one_speaks_for_another(
    server: LiveServer, people: dict[str, dict[str, str]]
) -> None:
    ann = people["ann"]
    answer = chat(server, ann)
    assert answer.status_code == 200, answer.text
    rid = int(answer.json()["id"])
    assert chat(server, ann, user="ben").status_code == 403
    forged = feedback(
        server, ann, {"kind": "thumbs", "response_id": rid, "value": 1, "rater": "ben"}
    )
    assert forged.status_code == 403 and "cannot speak for 'ben'" in forged.text
    own = feedback(server, ann, {"kind": "thumbs", "response_id": rid, "value": 1, "rater": "ann"})
    assert own.status_code == 201, own.text
    assert db_rows(server, "SELECT rater_id FROM responses WHERE id = ?", [rid]) == [("ann",)]
    assert db_rows(server, "SELECT rater_id FROM thumbs WHERE id = ?", [own.json()["id"]]) == [
        ("ann",)
    ]


def test_only_owners_judge_their_answers_and_raters_compare_anyones(
    server: LiveServer, people: dict[str, dict[str, str]]
) -> None:
    ann, ben, rae = people["ann"], people["ben"], people["rae"]
    first = chat(server, ann).json()
    a = int(first["id"])
    b = int(chat(server, ann, conversation_id=first["conversation_id"]).json()["id"])
    for kind, body in (
        ("thumbs", {"value": -1}),
        ("rating", {"value": 1}),
        ("edit", {"text": "Something else."}),
    ):
        for someone in (ben, rae):  # another user; a rater: single answers are their owner's
            refused = feedback(server, someone, {"kind": kind, "response_id": a, **body})
            assert refused.status_code == 403, (kind, refused.text)
            assert "may judge only the answers given to" in refused.text
    pair = {"kind": "comparison", "response_ids": [a, b], "winner": "a"}
    assert feedback(server, ben, pair).status_code == 403
    assert feedback(server, ben, {"kind": "ranking", "response_ids": [b, a]}).status_code == 403
    assert feedback(server, rae, pair).status_code == 201
    assert feedback(server, rae, {"kind": "ranking", "response_ids": [b, a]}).status_code == 201
    assert feedback(server, ann, pair).status_code == 201
    rows = db_rows(server, "SELECT rater_id FROM comparisons WHERE response_a = ?", [a])
    assert sorted(rows) == [("ann",), ("rae",)]
    edits = db_rows(server, "SELECT count(*) FROM edits WHERE response_id = ?", [a])
    assert edits == [(0,)]


def test_continuing_someone_elses_conversation_is_a_404(
    server: LiveServer, people: dict[str, dict[str, str]]
) -> None:
    first = chat(server, people["ann"]).json()
    conv = first["conversation_id"]
    before = db_rows(server, "SELECT count(*) FROM messages WHERE conversation_id = ?", [conv])
    for other in (people["ben"], people["otto"], server.auth):
        taken = chat(server, other, conversation_id=conv)
        assert taken.status_code == 404 and "unknown conversation" in taken.text
    after = db_rows(server, "SELECT count(*) FROM messages WHERE conversation_id = ?", [conv])
    assert after == before
    assert chat(server, people["ann"], conversation_id=conv).status_code == 200


def test_operator_and_admin_routes_check_the_role_and_audit_the_caller(
    server: LiveServer, people: dict[str, dict[str, str]]
) -> None:
    url = server.url
    for someone in (people["ann"], people["rae"]):
        for method, route in (
            ("POST", "/v1/admin/snapshot"),
            ("POST", "/v1/admin/rollback"),
            ("POST", "/v1/admin/train"),
            ("GET", "/v1/admin/versions"),
        ):
            refused = httpx.request(method, url + route, json={}, headers=someone)
            assert refused.status_code == 403, (route, refused.text)
            assert "this needs operator" in refused.text
    otto = people["otto"]
    snap = httpx.post(f"{url}/v1/admin/snapshot", headers=otto)
    assert snap.status_code == 200, snap.text
    made = httpx.post(f"{url}/v1/admin/users", json={"name": "eve", "role": "admin"}, headers=otto)
    assert made.status_code == 403 and "this needs admin" in made.text

    log = httpx.get(f"{url}/v1/admin/audit", headers=server.auth).json()
    assert {"actor": "otto", "action": "snapshot", "target": snap.json()["id"]}.items() <= log[
        0
    ].items()
    assert ("admin", "account.add", "otto") in {(e["actor"], e["action"], e["target"]) for e in log}


def test_the_audit_log_is_for_admins_and_filtered_by_actor_action_and_since(
    server: LiveServer, people: dict[str, dict[str, str]]
) -> None:
    def log(headers: dict[str, str] | None = None, **query: object) -> httpx.Response:
        return httpx.get(f"{server.url}/v1/admin/audit", params=query, headers=headers or auth)

    auth = server.auth
    refused = log(people["otto"])
    assert refused.status_code == 403 and "this needs admin" in refused.text
    server.account("audra")
    [first] = log(actor="admin", action="account.add", limit=1).json()
    assert first["target"] == "audra"
    server.account("aubrey", "rater")
    assert httpx.post(f"{server.url}/v1/admin/users/audra/disable", headers=auth).is_success

    def seen(**query: object) -> list[tuple[str, str, str]]:
        got = log(since=first["created_at"], **query)
        assert got.status_code == 200, got.text
        return [(e["actor"], e["action"], e["target"]) for e in got.json()]

    assert seen(actor="admin") == [
        ("admin", "account.disable", "audra"),
        ("admin", "account.add", "aubrey"),
        ("admin", "account.add", "audra"),
    ]
    assert seen(action="account.add") == [
        ("admin", "account.add", "aubrey"),
        ("admin", "account.add", "audra"),
    ]
    assert seen(actor="admin", action="account.disable") == [("admin", "account.disable", "audra")]
    assert seen(actor="admin", limit=1) == [("admin", "account.disable", "audra")]
    assert seen(actor="otto", action="account.add") == []
    assert log(since="2999-01-01").json() == []
    for bad in ("yesterday", "2026-13-01", ""):
        refused = log(since=bad)
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith(f"since: not an ISO date or datetime: {bad!r}")


def test_a_disabled_account_or_a_replaced_token_stops_working_at_once(
    server: LiveServer,
) -> None:
    headers = server.account("dora", "user")
    assert chat(server, headers).status_code == 200
    url = server.url
    assert httpx.post(f"{url}/v1/admin/users/dora/disable", headers=server.auth).status_code == 200
    assert chat(server, headers).status_code == 401
    assert httpx.post(f"{url}/v1/admin/users/dora/enable", headers=server.auth).status_code == 200
    assert chat(server, headers).status_code == 200
    new = httpx.post(f"{url}/v1/admin/users/dora/token", headers=server.auth).json()["token"]
    assert chat(server, headers).status_code == 401
    assert chat(server, {"Authorization": f"Bearer {new}"}).status_code == 200
    unknown = httpx.post(f"{url}/v1/admin/users/nobody/disable", headers=server.auth)
    assert unknown.status_code == 404
    stored = db_rows(server, "SELECT token_sha256 FROM accounts WHERE name = 'dora'")
    assert new not in str(stored)


def test_a_flood_from_one_account_is_cut_at_its_limit(server: LiveServer) -> None:
    """The default limit is 120 feedback rows a minute per user or rater: of 300 sent at once,
    the rest get 429 with Retry-After, and nothing past the limit is stored."""
    flood = server.account("flood", "rater")
    ann = server.account("annie", "user")
    first = chat(server, ann).json()
    answers = [int(first["id"])]
    for _ in range(24):  # 25 answers to one prompt: 300 different pairs to compare
        answers.append(
            int(chat(server, ann, conversation_id=first["conversation_id"]).json()["id"])
        )
    pairs = [(x, y) for i, x in enumerate(answers) for y in answers[i + 1 :]]
    a, b = pairs[0]
    statuses, started = [], time.monotonic()
    for i in range(300):
        pair = {"kind": "comparison", "response_ids": list(pairs[i]), "winner": "ab"[i % 2]}
        resp = feedback(server, flood, pair)
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert int(resp.headers["retry-after"]) >= 1
    accepted, took = statuses.count(201), time.monotonic() - started
    assert 120 <= accepted <= 120 + 2 * took + 1  # the burst, then 2 a second
    assert statuses.count(429) == 300 - accepted
    stored = db_rows(server, "SELECT count(*) FROM comparisons WHERE rater_id = 'flood'")
    assert stored == [(accepted,)]
    # Operators are not limited.
    for i in range(150):
        pair = {"kind": "comparison", "response_ids": list(pairs[i]), "winner": "tie"}
        assert feedback(server, server.auth, pair).status_code == 201


def test_sign_in_attempts_are_limited_per_address(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneloop.core.settings import LimitSettings

    limits = LimitSettings(logins_per_minute=3)
    for ui in live_server(tmp_path / "data", tiny_model_dir, limits=limits):
        wrong = {"username": "admin", "password": "tl_guess"}
        codes = [httpx.post(f"{ui.url}/login", data=wrong).status_code for _ in range(5)]
        assert codes == [400, 400, 400, 429, 429]
        right = httpx.post(f"{ui.url}/login", data={"username": "admin", "password": ui.token})
        assert right.status_code == 429  # the address waits, whatever it sends


def test_files_outside_the_data_dir_are_not_read_and_training_keys_are_an_allowlist(
    server: LiveServer, tmp_path: Path
) -> None:
    url, auth = server.url, server.auth
    outside = tmp_path / "pairs.jsonl"
    outside.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    for path in (str(outside), "/etc/passwd", str(server.data_dir.root / ".." / "x.jsonl")):
        refused = httpx.post(f"{url}/v1/admin/import", json={"path": path}, headers=auth)
        assert refused.status_code == 422 and "outside the folders" in refused.text
        for key in ("config_file", "gate_prompt_file", "accelerate_config"):
            train = {"kind": "dpo", key: path}
            refused = httpx.post(f"{url}/v1/admin/train", json=train, headers=auth)
            assert refused.status_code == 422 and "outside the folders" in refused.text
    inside = server.data_dir.inbox / "pairs.jsonl"
    inside.parent.mkdir(exist_ok=True)
    inside.write_text(outside.read_text())
    ok = httpx.post(f"{url}/v1/admin/import", json={"path": str(inside)}, headers=auth)
    assert ok.status_code == 200 and ok.json()["pairs"] == 1
    for key in ("push_to_hub=true", "hub_token=x", "report_to=wandb", "output_dir=/tmp/x"):
        train = {"kind": "dpo", "overrides": ["max_steps=1", key]}
        refused = httpx.post(f"{url}/v1/admin/train", json=train, headers=auth)
        assert refused.status_code == 422, key
        assert "is not a training setting a job takes" in refused.text
        train = {"kind": "dpo", "reward_overrides": [key]}
        assert httpx.post(f"{url}/v1/admin/train", json=train, headers=auth).status_code == 422


def test_a_rejected_version_is_served_only_with_force(server: LiveServer) -> None:
    url, auth = server.url, server.auth
    versions = httpx.get(f"{url}/v1/admin/versions", headers=auth).json()
    served = next(v for v in versions if v["status"] == "promoted")
    with duckdb.connect(str(server.data_dir.db)) as con:  # a candidate the gate turned down
        con.execute(
            "INSERT INTO model_versions SELECT 'policy-v9', kind, base, parent, artifact_path, "
            "adapter, snapshot_id, config, metrics, 'rejected', now(), 'gate: win rate 0.3', false "
            "FROM model_versions WHERE id = ?",
            [served["id"]],
        )
    refused = httpx.post(f"{url}/v1/admin/promote", json={"version": "policy-v9"}, headers=auth)
    assert refused.status_code == 409 and "was rejected (gate: win rate 0.3)" in refused.text
    forced = {"version": "policy-v9", "force": True}
    assert httpx.post(f"{url}/v1/admin/promote", json=forced, headers=auth).status_code == 200
    log = httpx.get(f"{url}/v1/admin/audit", headers=auth).json()
    assert log[0]["action"] == "promote" and log[0]["detail"] == {"force": True}
    back = httpx.post(f"{url}/v1/admin/rollback", headers=auth)
    assert back.status_code == 200 and back.json()["id"] == served["id"]


def test_the_data_dir_is_its_owners_alone_even_if_it_was_not(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    root = tmp_path / "data"
    (root / "runs" / "r1").mkdir(parents=True)
    old_log = root / "runs" / "r1" / "job.log"
    old_log.write_text("an old job's output")
    root.chmod(0o755)
    old_log.chmod(0o644)
    for server in live_server(root, tiny_model_dir, ui=False):
        assert oct(root.stat().st_mode & 0o777) == "0o700"
        assert oct(old_log.stat().st_mode & 0o777) == "0o600"
        assert oct(server.data_dir.admin_token_file.stat().st_mode & 0o777) == "0o600"
