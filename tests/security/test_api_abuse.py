"""Abuse of the API by signed-in accounts, on a real server (127.0.0.1): a k-way ranking counts
its pairs against the feedback limit, a user sees their own counts only, bad query values are
refused with 422, and no one's conversation goes to raters unless the operator opts in."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.settings import LimitSettings, TaskSettings

FEEDBACK_PER_MINUTE = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    # A backlog to keep, refilled often: only from traffic if the operator opted in (not here).
    tasks = TaskSettings(backlog=3, refill_seconds=0.1)
    limits = LimitSettings(feedback_per_minute=FEEDBACK_PER_MINUTE, chats_per_minute=0)
    data = tmp_path_factory.mktemp("abuse") / "data"
    yield from live_server(data, tiny_model_dir, ui=False, limits=limits, tasks=tasks)


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, dict[str, str]]:
    roles = {"ann": "user", "ben": "user", "otto": "operator"}
    return {name: server.account(name, role) for name, role in roles.items()}


def answers(server: LiveServer, headers: dict, prompt: str, n: int) -> list[int]:
    """`n` answers to `prompt`, regenerated in one conversation."""
    ids: list[int] = []
    conversation = None
    for _ in range(n):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
        if conversation is not None:
            body["conversation_id"] = conversation
        done = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        conversation = done.json()["conversation_id"]
        ids.append(int(done.json()["id"]))
    return ids


def rows(server: LiveServer, table: str) -> int:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def test_a_ranking_counts_its_pairs_against_the_feedback_limit(
    server: LiveServer, people: dict
) -> None:
    ids = answers(server, people["ann"], "Rank me.", 5)
    ranking = {"kind": "ranking", "response_ids": ids}
    sent = httpx.post(f"{server.url}/v1/feedback", json=ranking, headers=people["ann"])
    assert sent.status_code == 201  # 5 answers: 10 pairs, the whole minute's limit
    thumbs = {"kind": "thumbs", "response_id": ids[0], "value": 1}
    refused = httpx.post(f"{server.url}/v1/feedback", json=thumbs, headers=people["ann"])
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert rows(server, "thumbs") == 0
    # Another account's limit is its own.
    ben = answers(server, people["ben"], "Rank me too.", 2)
    thumbs = {"kind": "thumbs", "response_id": ben[0], "value": 1}
    assert httpx.post(f"{server.url}/v1/feedback", json=thumbs, headers=people["ben"]).is_success


def test_a_user_sees_their_own_counts_an_operator_all(server: LiveServer, people: dict) -> None:
    answers(server, people["ben"], "Count me.", 1)
    ann = httpx.get(f"{server.url}/v1/feedback/stats", headers=people["ann"]).json()
    ben = httpx.get(f"{server.url}/v1/feedback/stats", headers=people["ben"]).json()
    every = httpx.get(f"{server.url}/v1/feedback/stats", headers=people["otto"]).json()
    assert ann["responses"] == 5 and ann["ranking"] == 1
    assert ben["ranking"] == 0
    assert every["responses"] == rows(server, "responses") == ann["responses"] + ben["responses"]


@pytest.mark.parametrize(
    "route",
    [
        "/v1/admin/audit?limit=-1",
        "/v1/admin/audit?limit=0",
        "/v1/admin/audit?limit=lots",
        "/v1/admin/runs?limit=-1",
        "/v1/admin/leaderboard?rounds=-5",
    ],
)
def test_bad_query_values_are_422(server: LiveServer, route: str) -> None:
    got = httpx.get(server.url + route, headers=server.auth)
    assert got.status_code == 422, got.text


def test_import_limit_below_one_is_422(server: LiveServer) -> None:
    body = {"path": "nothing.jsonl", "limit": -1}
    got = httpx.post(f"{server.url}/v1/admin/import", json=body, headers=server.auth)
    assert got.status_code == 422


def test_no_conversation_goes_to_raters_without_the_operators_opt_in(
    server: LiveServer, people: dict
) -> None:
    answers(server, people["ben"], "Something private.", 1)
    time.sleep(1.0)  # ten refill rounds
    assert rows(server, "tasks") == 0
