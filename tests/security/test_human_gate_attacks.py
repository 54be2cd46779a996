"""Who moves the human gate, on a real server (127.0.0.1): only raters' blind judgments on canary
tasks the queue handed them count, at most a share each; a plain user's own comparisons,
rankings and thumbs of both versions' answers, and a rater's direct vote on a task's answers,
change nothing; a quarantined rater's judgments leave a running verdict at once, and a decided
canary is flagged."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import LimitSettings
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

RATERS = ("r0", "r1", "r2", "r3")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model_dir_b: Path):
    """policy-v1 served; policy-v2 (other weights) the candidate."""
    data = tmp_path_factory.mktemp("gate-attacks") / "data"
    with FeedbackStore(DataDir(data).db) as store:
        for vid, path in (("v1", tiny_model_dir), ("v2", tiny_model_dir_b)):
            version = ModelVersion(f"policy-{vid}", "policy", str(tiny_model_dir), str(path))
            registry.register_version(store, version)
        registry.promote(store, "policy-v1", reason="the test's baseline")
    yield from live_server(data, None, ui=False, limits=LimitSettings(0, 0))


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, dict[str, str]]:
    roles = {"mal": "user", "otto": "operator"} | {name: "rater" for name in RATERS}
    return {name: server.account(name, role) for name, role in roles.items()}


def post(server: LiveServer, route: str, headers: dict, **body: object) -> httpx.Response:
    return httpx.post(server.url + route, json=body, headers=headers, timeout=120)


def get(server: LiveServer, route: str, headers: dict) -> httpx.Response:
    return httpx.get(server.url + route, headers=headers, timeout=60)


def running_verdict(server: LiveServer, people: dict) -> dict:
    return get(server, "/v1/admin/canary", people["otto"]).json()["running"]["verdict"]


def held_task(server: LiveServer, rater: dict) -> dict:
    task = get(server, "/v1/tasks/next?kind=comparison", rater).json()["task"]
    assert task is not None
    return task


def task_answers(server: LiveServer, people: dict, task_id: int) -> dict[str, int]:
    """The task's answer ids by version, as the operator's view tells."""
    detail = get(server, f"/v1/admin/tasks/{task_id}", people["otto"]).json()
    return {a["version"]: a["id"] for a in detail["answers"]}


def test_only_raters_blind_judgments_on_canary_tasks_count(
    server: LiveServer, people: dict
) -> None:
    started = post(
        server, "/v1/admin/canary", people["otto"], version="policy-v2", share=0.5,
        judgments=4, win_rate=0.5, rater_share=0.25,
    )  # fmt: skip
    assert started.status_code == 201, started.text

    # A plain user asks one question until they hold answers of both versions ...
    answers: dict[str, list[int]] = {}
    for _ in range(60):
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}
        done = post(server, "/v1/chat/completions", people["mal"], **body).json()
        answers.setdefault(done["model"], []).append(int(done["id"]))
        if len(answers) == 2 and min(len(ids) for ids in answers.values()) >= 3:
            break
    mine, theirs = answers["policy-v2"], answers["policy-v1"]
    # ... and votes for the canary through every route a user has: stored, and counted nowhere.
    for m, t in zip(mine, theirs, strict=False):
        body = {"kind": "comparison", "response_ids": [m, t], "winner": "a"}
        assert post(server, "/v1/feedback", people["mal"], **body).status_code == 201
        body = {"kind": "ranking", "response_ids": [m, t]}
        assert post(server, "/v1/feedback", people["mal"], **body).status_code == 201
        for rid, value in ((m, 1), (t, -1)):
            body = {"kind": "thumbs", "response_id": rid, "value": value}
            assert post(server, "/v1/feedback", people["mal"], **body).status_code == 201
    assert get(server, "/v1/tasks/next", people["mal"]).status_code == 403
    assert post(server, "/v1/admin/canary/check", people["mal"]).status_code == 403
    assert running_verdict(server, people)["judgments"] == 0

    made = post(
        server, "/v1/admin/tasks", people["otto"], source="prompts",
        prompts=[f"Name a colour, {i}." for i in range(4)], overlap=4,
    ).json()["made"]  # fmt: skip
    assert len(made) == 4

    # A rater's vote posted directly on a canary task's answers is no blind judgment.
    task = held_task(server, people["r0"])
    ids = task_answers(server, people, task["task_id"])
    direct = {"kind": "comparison", "response_ids": [ids["policy-v2"], ids["policy-v1"]]}
    assert post(server, "/v1/feedback", people["r0"], **direct, winner="a").status_code == 201
    assert running_verdict(server, people)["judgments"] == 0
    # Through the task it counts ...
    route = f"/v1/tasks/{task['task_id']}/judgment"
    assert post(server, route, people["r0"], winner="a").status_code == 201
    assert running_verdict(server, people)["judgments"] == 1
    # ... and a direct vote on the same answers replaces it, and it counts no more.
    assert post(server, "/v1/feedback", people["r0"], **direct, winner="b").status_code == 201
    assert running_verdict(server, people)["judgments"] == 0

    # One rater counts for a quarter of the 4 judgments waited for: one, however many they give.
    for _ in range(3):
        task = held_task(server, people["r1"])
        judged = post(server, f"/v1/tasks/{task['task_id']}/judgment", people["r1"], winner="a")
        assert judged.status_code == 201, judged.text
    verdict = running_verdict(server, people)
    assert verdict["judgments"] == 1 and verdict["by_rater"] == {"r1": 1}
    assert verdict["over_share"] == 2
    post(server, "/v1/admin/canary/check", people["otto"]).raise_for_status()
    running = get(server, "/v1/admin/canary", people["otto"]).json()["running"]
    assert (running["version"], running["baseline"]) == ("policy-v2", "policy-v1")
    assert running["verdict"]["judgments"] == 1  # undecided: 4 are waited for

    # A quarantined rater's judgments leave the running verdict at once.
    quarantined = post(server, "/v1/admin/raters/quarantine", people["otto"], names=["r1"])
    assert quarantined.json()["quarantined"] == ["r1"]
    assert running_verdict(server, people)["judgments"] == 0
    assert post(server, "/v1/admin/raters/r1/reinstate", people["otto"]).status_code == 200


def test_a_decided_canary_is_flagged_when_one_of_its_raters_is_quarantined(
    server: LiveServer, people: dict
) -> None:
    """Runs after the test above: the canary waits for 4 raters, one judgment each."""
    for name in ("r0", "r2", "r3"):
        task = held_task(server, people[name])
        post(server, f"/v1/tasks/{task['task_id']}/judgment", people[name], winner="a")
    post(server, "/v1/admin/canary/check", people["otto"]).raise_for_status()
    state = get(server, "/v1/admin/canary", people["otto"]).json()
    assert state["running"] is None
    decided = state["history"][0]
    assert decided["status"] in ("promoted", "rejected")
    assert sorted(decided["result"]["by_rater"]) == ["r0", "r1", "r2", "r3"]
    assert decided["flagged"] == []

    post(server, "/v1/admin/raters/quarantine", people["otto"], names=["r2"]).raise_for_status()
    state = get(server, "/v1/admin/canary", people["otto"]).json()
    assert state["history"][0]["flagged"] == ["r2"]
    assert state["history"][0]["status"] == decided["status"]  # not reopened
    loop = get(server, "/v1/admin/loop", people["otto"]).json()
    assert loop["flagged_canaries"] == [
        {"version": "policy-v2", "status": decided["status"], "raters": ["r2"]}
    ]
