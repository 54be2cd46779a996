"""Raters weighed while they judge, through a real server (127.0.0.1): the rating desk weighs the
raters every `TRUST_EVERY` judgments, so one who fails gold is quarantined without waiting for a
training cycle, and from then on gets gold tasks only: the tasks that need judging wait for
raters in good standing."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.settings import TaskSettings
from tuneloop.serve.rating_desk import TRUST_EVERY

GOLD = 2 * TRUST_EVERY  # the gold tasks the failing rater judges: 20 votes, past 15
OPEN = 4  # tasks that need judging


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    # Gold first at every fetch, so that the failing rater's first judgments are gold.
    tasks = TaskSettings(backlog=0, gold_every=1)
    yield from live_server(
        tmp_path_factory.mktemp("trust") / "data", tiny_model_dir, ui=False, tasks=tasks
    )


def call(server: LiveServer, method: str, route: str, headers: dict, **body) -> httpx.Response:
    url = server.url + route
    resp = httpx.request(method, url, json=body or None, headers=headers, timeout=600)
    resp.raise_for_status()
    return resp


def quarantined(server: LiveServer) -> dict[str, tuple[str, str]]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        rows = con.execute("SELECT rater_id, actor, reason FROM quarantine").fetchall()
    return {name: (actor, reason) for name, actor, reason in rows}


def test_a_rater_failing_gold_is_held_as_they_judge_and_gets_gold_only(server: LiveServer):
    otto = server.account("otto", "operator")
    inv = server.account("inv", "rater")
    prompts = [f"Question number {i}?" for i in range(GOLD + OPEN + 2)]
    made = call(server, "POST", "/v1/admin/tasks", otto, source="prompts", prompts=prompts,
                overlap=1).json()["made"]  # fmt: skip
    gold_text: dict[int, str] = {}
    open_tasks = []
    for tid in made:
        answers = call(server, "GET", f"/v1/admin/tasks/{tid}", otto).json()["answers"]
        texts = [a["text"] for a in answers]
        if len(gold_text) < GOLD and len(set(texts)) == len(texts):
            best = answers[len(gold_text) % 2]  # either answer: gold verdicts vary
            call(server, "POST", f"/v1/admin/tasks/{tid}/gold", otto, response_id=best["id"])
            gold_text[tid] = best["text"]
        else:
            open_tasks.append(tid)
    assert len(gold_text) == GOLD and len(open_tasks) >= OPEN

    for _ in range(GOLD):  # always the answer gold says is worse
        task = call(server, "GET", "/v1/tasks/next?kind=comparison", inv).json()["task"]
        assert task["task_id"] in gold_text
        winner = "b" if task["answers"][0] == gold_text[task["task_id"]] else "a"
        call(server, "POST", f"/v1/tasks/{task['task_id']}/judgment", inv, winner=winner)

    deadline = time.monotonic() + 30  # the desk weighs in a thread of its own
    while "inv" not in quarantined(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    actor, reason = quarantined(server)["inv"]
    assert actor == "tuneloop"
    assert reason.startswith("trust weight 0.00 < 0.5 (at best 0.00): reliability -1.00")
    assert f"gold 0/{GOLD}" in reason
    # Every gold task judged: nothing for them, though tasks wait that need judging.
    assert call(server, "GET", "/v1/tasks/next", inv).json()["task"] is None

    call(server, "POST", "/v1/admin/raters/inv/reinstate", otto)
    task = call(server, "GET", "/v1/tasks/next?kind=comparison", inv).json()["task"]
    assert task["task_id"] in open_tasks  # reinstated: the queue knows at once
