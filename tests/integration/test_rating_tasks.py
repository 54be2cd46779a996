"""The raters' workbench through the API of a real server (127.0.0.1): tasks made from what
users asked, handed to k raters blind, judged, skipped; gold scoring, agreement, quarantine and
the leaderboard for operators; roles checked on every route."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    yield from live_server(tmp_path_factory.mktemp("tasks") / "data", tiny_model_dir, ui=False)


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, dict[str, str]]:
    roles = {"ann": "rater", "ben": "user", "otto": "operator"}
    roles |= {f"r{i}": "rater" for i in range(4)}
    return {name: server.account(name, role) for name, role in roles.items()}


def call(server: LiveServer, method: str, route: str, headers: dict, **body) -> httpx.Response:
    return httpx.request(
        method, server.url + route, json=body or None, headers=headers, timeout=120
    )


def ask(server: LiveServer, headers: dict, prompt: str) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    resp.raise_for_status()
    return resp.json()


def db(server: LiveServer, sql: str) -> list[tuple]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(sql).fetchall()


def test_raters_judge_real_traffic_blind_each_task_k_times_never_their_own(
    server: LiveServer, people: dict
) -> None:
    asked = {
        "ann": [ask(server, people["ann"], f"ann asks {i}") for i in range(2)],
        "ben": [ask(server, people["ben"], f"ben asks {i}") for i in range(2)],
    }
    made = call(server, "POST", "/v1/admin/tasks", people["otto"], limit=10, overlap=3)
    assert made.status_code == 201, made.text
    assert len(made.json()["made"]) == 4
    # Only raters get tasks; users and no one else.
    assert call(server, "GET", "/v1/tasks/next", people["ben"]).status_code == 403
    assert call(server, "GET", "/v1/tasks/next", {}).status_code == 401

    judged: dict[int, list[str]] = {}
    for _ in range(6):
        for name in ("ann", "r0", "r1", "r2", "r3"):
            got = call(server, "GET", "/v1/tasks/next?kind=comparison", people[name]).json()
            task = got["task"]
            if task is None:
                continue
            assert set(task) == {"task_id", "kind", "prompt", "answers"}  # no ids, no versions
            assert len(task["answers"]) == 2
            prompt = task["prompt"][-1]["content"]
            assert not (name == "ann" and prompt.startswith("ann asks"))
            done = call(
                server, "POST", f"/v1/tasks/{task['task_id']}/judgment", people[name], winner="a"
            )
            assert done.status_code == 201, done.text
            judged.setdefault(task["task_id"], []).append(name)
    assert len(judged) == 4
    assert all(len(v) == 3 == len(set(v)) for v in judged.values())
    # One answer of each task is the one its user was given.
    given = {int(c["id"]) for chats in asked.values() for c in chats}
    in_tasks = {i for (ids,) in db(server, "SELECT response_ids FROM tasks") for i in ids}
    assert given <= in_tasks
    counts = call(server, "GET", "/v1/admin/tasks", people["otto"]).json()
    assert counts["done"] == 4 and counts["judgments"] == 12
    progress = call(server, "GET", "/v1/tasks/next", people["r0"]).json()["progress"]
    assert progress["judged"] >= 2


def test_a_task_not_held_cannot_be_judged_and_a_skip_hands_it_on(
    server: LiveServer, people: dict
) -> None:
    made = call(
        server, "POST", "/v1/admin/tasks", people["otto"], source="prompts",
        prompts=["Name a prime."], answers=3, overlap=1,
    ).json()["made"]  # fmt: skip
    (tid,) = made
    refused = call(server, "POST", f"/v1/tasks/{tid}/judgment", people["r0"], ranking=[0, 1, 2])
    assert refused.status_code == 404
    task = call(server, "GET", "/v1/tasks/next?kind=ranking", people["r0"]).json()["task"]
    assert task["task_id"] == tid and task["kind"] == "ranking" and len(task["answers"]) == 3
    wrong = call(server, "POST", f"/v1/tasks/{tid}/judgment", people["r0"], winner="a")
    assert wrong.status_code == 422
    assert call(server, "POST", f"/v1/tasks/{tid}/skip", people["r0"]).status_code == 200
    assert call(server, "GET", "/v1/tasks/next?kind=ranking", people["r0"]).json()["task"] is None
    task = call(server, "GET", "/v1/tasks/next?kind=ranking", people["r1"]).json()["task"]
    assert task["task_id"] == tid
    done = call(server, "POST", f"/v1/tasks/{tid}/judgment", people["r1"], ranking=[2, 0, 1])
    assert done.status_code == 201


def test_operators_see_agreement_gold_and_the_leaderboard_and_quarantine(
    server: LiveServer, people: dict
) -> None:
    (tid,) = call(
        server, "POST", "/v1/admin/tasks", people["otto"], source="prompts",
        prompts=["Is ice cold?"], overlap=2,
    ).json()["made"]  # fmt: skip
    detail = call(server, "GET", f"/v1/admin/tasks/{tid}", people["otto"]).json()
    best = detail["answers"][0]["id"]
    assert {a["version"] for a in detail["answers"]}  # operators see the versions
    marked = call(server, "POST", f"/v1/admin/tasks/{tid}/gold", people["otto"], response_id=best)
    assert marked.status_code == 200
    assert call(server, "POST", f"/v1/admin/tasks/{tid}/gold", people["r0"]).status_code == 403
    for name in ("r2", "r3"):
        for _ in range(12):  # gold comes first within a rater's next ten fetches
            task = call(server, "GET", "/v1/tasks/next", people[name]).json()["task"]
            if task is None or task["task_id"] == tid:
                break
            call(server, "POST", f"/v1/tasks/{task['task_id']}/skip", people[name])
        assert task is not None and task["task_id"] == tid
        shown = detail["answers"]
        a_is_best = task["answers"][0] == next(a["text"] for a in shown if a["id"] == best)
        right = name == "r2"
        winner = "a" if a_is_best == right else "b"
        call(server, "POST", f"/v1/tasks/{tid}/judgment", people[name], winner=winner)
    report = call(server, "GET", "/v1/admin/raters", people["otto"]).json()
    by_name = {r["name"]: r for r in report["raters"]}
    assert by_name["r2"]["gold_accuracy"] == 1.0 and by_name["r3"]["gold_accuracy"] == 0.0
    # r2 and r3 disagree on the gold task: agreement is defined and short of perfect.
    assert -1.0 <= report["alpha"] < 1.0
    board = call(server, "GET", "/v1/admin/leaderboard?rounds=50", people["otto"])
    assert board.status_code == 200 and isinstance(board.json(), list)
    assert call(server, "GET", "/v1/admin/raters", people["r0"]).status_code == 403

    held = call(
        server, "POST", "/v1/admin/raters/quarantine", people["otto"], below_gold=0.5,
        min_judgments=1, reason="fails gold",
    ).json()  # fmt: skip
    assert held["quarantined"] == ["r3"]
    snap = call(server, "POST", "/v1/admin/snapshot", people["otto"]).json()
    comparisons = Path(snap["path"]) / snap["manifest"]["tables"]["comparisons"]["file"]
    with duckdb.connect() as con:
        kept = {r for (r,) in con.execute(f"SELECT rater_id FROM '{comparisons}'").fetchall()}
    assert "r3" not in kept and "r2" in kept
    assert call(server, "POST", "/v1/admin/raters/r3/reinstate", people["otto"]).status_code == 200
    assert call(server, "POST", "/v1/admin/raters/r3/reinstate", people["otto"]).status_code == 404


def test_the_server_keeps_its_backlog_of_tasks_from_new_traffic(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from tuneloop.core.settings import TaskSettings

    tasks = TaskSettings(backlog=3, refill_seconds=0.2, from_traffic=True)
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False, tasks=tasks):
        user = server.account("una")
        for i in range(5):
            ask(server, user, f"una asks {i}")
        deadline = time.monotonic() + 60
        while len(db(server, "SELECT id FROM tasks")) < 3:
            assert time.monotonic() < deadline, "no tasks were made"
            time.sleep(0.2)
        time.sleep(1.0)  # refills come while fewer than 3 are open: none now
        assert db(server, "SELECT count(*), min(source) FROM tasks") == [(3, "traffic")]


def test_raters_rate_and_edit_the_answers_given_to_them_by_position(
    server: LiveServer, people: dict
) -> None:
    (tid,) = call(
        server, "POST", "/v1/admin/tasks", people["otto"], source="prompts",
        prompts=["Spell 'cat'."], overlap=1,
    ).json()["made"]  # fmt: skip
    route = f"/v1/tasks/{tid}/answers/1"
    rating = {"kind": "rating", "value": 4, "reason": "close"}
    assert call(server, "POST", route, people["r1"], **rating).status_code == 404  # not held
    got = call(server, "GET", "/v1/tasks/next?kind=comparison", people["r1"]).json()["task"]
    assert got["task_id"] == tid
    stored = call(server, "POST", route, people["r1"], **rating)
    assert stored.status_code == 201, stored.text
    edit = call(
        server, "POST", f"/v1/tasks/{tid}/answers/0", people["r1"], kind="edit", text="c-a-t"
    )
    assert edit.status_code == 201
    bad = call(server, "POST", f"/v1/tasks/{tid}/answers/2", people["r1"], kind="thumbs", value=1)
    assert bad.status_code == 422
    # The values are refused with the words the feedback API and the UI use (`check_feedback`).
    empty = "edit text is empty: an edit is the answer as it should read"
    for body, message in [
        ({"kind": "edit"}, empty),
        ({"kind": "edit", "text": ""}, empty),
        ({"kind": "edit", "text": " \n"}, empty),
        ({"kind": "thumbs", "value": 2}, "thumbs value must be 1 or -1, got 2"),
        ({"kind": "rating", "value": 6}, "rating value must be an integer from 1 to 5, got 6"),
        ({"kind": "rating"}, "rating value must be an integer from 1 to 5, got None"),
    ]:
        refused = call(server, "POST", route, people["r1"], **body)
        assert (refused.status_code, refused.json()["error"]["message"]) == (422, message)
    refused = call(server, "POST", f"/v1/tasks/{tid}/judgment", people["r1"], winner="c")
    assert refused.status_code == 422
    assert refused.json()["error"]["message"] == (
        "winner must be one of a, b, tie, both_bad, got 'c'"
    )
    assert call(server, "POST", route, people["ben"], **rating).status_code == 403
    answers = {
        i for (ids,) in db(server, f"SELECT response_ids FROM tasks WHERE id = {tid}") for i in ids
    }
    rows = db(server, f"SELECT response_id, rater_id FROM ratings WHERE id = {stored.json()['id']}")
    assert rows[0][0] in answers and rows[0][1] == "r1"
