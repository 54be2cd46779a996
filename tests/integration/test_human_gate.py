"""The human gate on a real server (127.0.0.1): a candidate held in canary answers its share of
conversations, rating tasks pit it against the served version, and people's verdicts promote
or reject it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import LimitSettings
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

SHARE = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model_dir_b: Path):
    """policy-v1 served; policy-v2 (other weights) and policy-v3 (v1's) candidates."""
    data = tmp_path_factory.mktemp("human") / "data"
    with FeedbackStore(DataDir(data).db) as store:
        for vid, path in (("v1", tiny_model_dir), ("v2", tiny_model_dir_b), ("v3", tiny_model_dir)):
            version = ModelVersion(f"policy-{vid}", "policy", str(tiny_model_dir), str(path))
            registry.register_version(store, version)
        registry.promote(store, "policy-v1", reason="the test's baseline")
    # Thousands of chats from one person: no per-account limit here.
    yield from live_server(data, None, ui=False, limits=LimitSettings(0, 0))


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, dict[str, str]]:
    roles = {"una": "user", "otto": "operator"} | {f"r{i}": "rater" for i in range(3)}
    return {name: server.account(name, role) for name, role in roles.items()}


def post(server: LiveServer, route: str, headers: dict, **body) -> httpx.Response:
    return httpx.post(server.url + route, json=body, headers=headers, timeout=300)


def chat(server: LiveServer, headers: dict, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    return post(server, "/v1/chat/completions", headers, **body).raise_for_status().json()["model"]


def judge_all(server: LiveServer, people: dict, prefer: str) -> int:
    """Raters judge every canary task, preferring the answer of version `prefer` (which an
    operator's view of the task tells; the raters' view is blind)."""
    judged = 0
    for name in ("r0", "r1", "r2"):
        while True:
            got = httpx.get(f"{server.url}/v1/tasks/next", headers=people[name]).json()["task"]
            if got is None:
                break
            detail = httpx.get(
                f"{server.url}/v1/admin/tasks/{got['task_id']}", headers=people["otto"]
            ).json()
            version_of = {a["text"]: a["version"] for a in detail["answers"]}
            first = version_of[got["answers"][0]]
            route = f"/v1/tasks/{got['task_id']}/judgment"
            post(server, route, people[name], winner="a" if first == prefer else "b")
            judged += 1
    return judged


def decide(server: LiveServer, people: dict) -> dict:
    """Ask for the decision now (the loop's scheduler may have made it already); the canary's
    record."""
    post(server, "/v1/admin/canary/check", people["otto"]).raise_for_status()
    history = httpx.get(f"{server.url}/v1/admin/canary", headers=people["otto"]).json()
    assert history["running"] is None
    return history["history"][0]


@pytest.mark.slow  # 2,000 answers: about a minute and a half
def test_a_canary_gets_its_share_and_people_promote_then_reject(
    server: LiveServer, people: dict
) -> None:
    started = post(
        server, "/v1/admin/canary", people["otto"], version="policy-v2", share=SHARE,
        judgments=12, win_rate=0.5, rater_share=0.34,
    )  # fmt: skip
    assert started.status_code == 201, started.text
    assert post(server, "/v1/admin/canary", people["otto"], version="policy-v3").status_code == 409
    assert post(server, "/v1/admin/canary", people["r0"], version="policy-v3").status_code == 403

    with ThreadPoolExecutor(8) as pool:
        answered = list(pool.map(lambda i: chat(server, people["una"], f"hi {i}"), range(2000)))
    share = answered.count("policy-v2") / len(answered)
    assert abs(share - SHARE) <= 0.03, share
    assert set(answered) == {"policy-v1", "policy-v2"}

    made = post(server, "/v1/admin/tasks", people["otto"], limit=6, overlap=3).json()["made"]
    assert len(made) == 6
    detail = httpx.get(f"{server.url}/v1/admin/tasks/{made[0]}", headers=people["otto"]).json()
    assert detail["source"] == "canary"
    assert {a["version"] for a in detail["answers"]} == {"policy-v1", "policy-v2"}
    status = httpx.get(f"{server.url}/v1/admin/canary", headers=people["otto"]).json()
    assert status["running"]["version"] == "policy-v2"

    assert judge_all(server, people, prefer="policy-v2") == 18
    decided = decide(server, people)
    # The loop's own poll may decide first, as soon as the 12 judgments asked for are in.
    assert decided["status"] == "promoted" and 12 <= decided["result"]["judgments"] <= 18
    assert httpx.get(f"{server.url}/health").json()["model_version"] == "policy-v2"
    versions = {
        v["id"]: v
        for v in httpx.get(f"{server.url}/v1/admin/versions", headers=people["otto"]).json()
    }
    assert versions["policy-v2"]["status"] == "promoted"
    assert versions["policy-v2"]["metrics"]["human_gate"]["win_rate"] == 1.0

    # A worse candidate: people prefer what serves, and it goes.
    post(
        server, "/v1/admin/canary", people["otto"], version="policy-v3", judgments=6,
        rater_share=0.34,
    )  # fmt: skip
    for i in range(40):
        chat(server, people["una"], f"again {i}")
    post(server, "/v1/admin/tasks", people["otto"], limit=2, overlap=3).raise_for_status()
    judge_all(server, people, prefer="policy-v2")
    assert decide(server, people)["status"] == "rejected"
    assert {chat(server, people["una"], f"after {i}") for i in range(30)} == {"policy-v2"}
    history = httpx.get(f"{server.url}/v1/admin/canary", headers=people["otto"]).json()
    assert [c["status"] for c in history["history"]] == ["rejected", "promoted"]
    assert history["running"] is None
