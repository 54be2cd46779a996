"""The loop through a real server on 127.0.0.1: feedback in through the API, a training cycle
(reward model, DPO, gate) run as job processes, promotion or rejection, hot-swaps under streams,
and failed jobs that leave serving alone."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, live_server
from loop_client import (
    admin,
    ask,
    db_rows,
    health,
    openai_client,
    stored_versions,
    streams_running,
    wait_for_answers,
)

from tuneloop.core.config import DataDir
from tuneloop.core.settings import GateSettings
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore

TOPICS = ("lists", "tuples", "dicts", "sets", "strings", "files", "loops", "classes")
CYCLE_TIMEOUT_S = 300
# The chosen answer always says "Certainly": a preference the tiny reward model picks up at once.
TRL_PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}: what about {topic}?"}],
        "chosen": [{"role": "assistant", "content": f"Certainly, {topic} are useful here."}],
        "rejected": [{"role": "assistant", "content": f"No idea about {topic} at all."}],
    }
    for i, topic in enumerate(TOPICS * 3)
]


# --- helpers --------------------------------------------------------------------------------------


def write_pairs(path: Path, pairs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def collect_feedback(server: LiveServer, tmp_path: Path, prompts: int = 4) -> int:
    """Real chats and comparisons through the API, plus an imported TRL file; comparisons made."""
    client = openai_client(server)
    for i in range(prompts):
        text = f"Tell me about {TOPICS[i]}."
        a, b = (ask(client, text, temperature=1.0) for _ in range(2))
        assert a.model == b.model == health(server)
        ack = httpx.post(
            f"{server.url}/v1/feedback",
            json={"kind": "comparison", "response_ids": [int(a.id), int(b.id)], "winner": "a"},
            headers=server.auth,
            timeout=30,
        )
        assert ack.status_code == 201, ack.text
    with admin(server) as api:
        imported = api.post(
            "/v1/admin/import",
            json={"path": str(write_pairs(server.data_dir.root / "p.jsonl", TRL_PAIRS))},
        )
        assert imported.status_code == 200, imported.text
        assert imported.json()["pairs"] == len(TRL_PAIRS)
    stats = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth, timeout=30).json()
    assert stats["comparison"] == prompts + len(TRL_PAIRS)
    return stats["comparison"]


def start_cycle(api: httpx.Client, overrides: list[str], kind: str = "dpo") -> None:
    started = api.post("/v1/admin/train", json={"kind": kind, "overrides": overrides})
    assert started.status_code == 202, started.text
    assert started.json() == {"started": kind}


def wait_for_cycle(api: httpx.Client, timeout: float = CYCLE_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loop = api.get("/v1/admin/loop").json()
        if not loop["busy"]:
            assert loop["last_cycle"] is not None
            return loop
        time.sleep(0.5)
    raise AssertionError(f"the training cycle did not end within {timeout} s")


def runs_by_kind(api: httpx.Client) -> dict[str, dict[str, Any]]:
    """The newest run of each kind."""
    out: dict[str, dict[str, Any]] = {}
    for run in api.get("/v1/admin/runs").json():  # newest first
        out.setdefault(run["kind"], run)
    return out


def ran_for(run: dict[str, Any]) -> float:
    """Seconds from a run's start to its end (both ISO timestamps; a run not ended fails)."""
    finished, started = (datetime.fromisoformat(run[k]) for k in ("finished_at", "started_at"))
    return (finished - started).total_seconds()


def versions_by_id(api: httpx.Client) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in api.get("/v1/admin/versions").json()}


def check_cycle_rows(
    api: httpx.Client, loop: dict[str, Any], comparisons: int, gate_bar: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs and versions a finished rm -> dpo -> gate cycle leaves; (candidate, gate result)."""
    cycle = loop["last_cycle"]
    assert cycle["status"] == "done", cycle
    assert (cycle["kind"], cycle["trigger"]) == ("dpo", "operator")
    runs = runs_by_kind(api)
    assert set(runs) == {"rm", "dpo", "gate"}
    for kind in ("rm", "dpo", "gate"):
        run = runs[kind]
        assert (run["status"], run["progress"], run["stage"]) == ("done", 1.0, "done"), run
        assert run["error"] is None and ran_for(run) >= 0, run
        assert run["snapshot_id"] == cycle["snapshot_id"]
    assert runs["rm"]["version_id"] == cycle["reward_version"] == "reward-v1"
    assert runs["dpo"]["version_id"] == runs["gate"]["version_id"] == cycle["candidate_version"]
    assert runs["dpo"]["config"]["overrides"] == {"max_steps": 4}

    versions = versions_by_id(api)
    reward, candidate = versions["reward-v1"], versions[cycle["candidate_version"]]
    assert (reward["kind"], reward["status"]) == ("reward", "promoted")
    assert candidate["id"] == "policy-v2" and candidate["kind"] == "policy"
    assert candidate["parent"] == "policy-v1"
    assert candidate["adapter"] is True and Path(candidate["artifact_path"]).is_dir()
    for version in (reward, candidate):
        assert version["snapshot_id"] == cycle["snapshot_id"]
        assert version["metrics"]["feedback_rows"]["comparison"] == comparisons
    assert candidate["metrics"]["steps"] == 4
    # The cycle's reward model trains with its own defaults: 3 epochs over the few pairs here.
    # Every held-out pair of the snapshot was scored; the accuracy counts them (ties half).
    heldout = reward["metrics"]["data"]["preference"]["heldout"]
    assert reward["metrics"]["steps"] > 0 and reward["metrics"]["heldout_pairs"] == heldout > 0
    half_wins = 2 * reward["metrics"]["heldout_accuracy"] * heldout
    assert abs(half_wins - round(half_wins)) < 1e-6
    gate = candidate["metrics"]["gate"]
    assert 0.0 <= gate["ci_low"] <= gate["win_rate"] <= gate["ci_high"] <= 1.0
    assert gate["wins"] + gate["ties"] + gate["losses"] == gate["prompts"] == 8
    # Same tokenizer: the KL to the parent is known, and LoRA after 4 steps stays close.
    assert gate["kl_to_parent"] is not None and 0.0 <= gate["kl_to_parent"] < 1.0
    assert (gate["incumbent"], gate["reward_model"]) == ("policy-v1", "reward-v1")
    assert gate["reason"] == cycle["reason"] and gate["reason"].startswith("win rate ")
    assert runs["gate"]["metrics"]["win_rate"] == gate["win_rate"]
    assert runs["gate"]["config"]["min_win_rate"] == gate_bar
    return candidate, gate


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def two_policies(tmp_path: Path, tiny_model_dir: Path, tiny_model_dir_b: Path) -> Path:
    """A data dir whose registry holds policy-v1 (seed 1, retired) and policy-v2 (seed 0,
    promoted, so served)."""
    dd = DataDir(tmp_path / "data")
    store = FeedbackStore(dd.db)
    try:
        for model in (tiny_model_dir_b, tiny_model_dir):
            ensure_served_policy(store, str(model), str, reason="served by the test")
    finally:
        store.close()
    return dd.root


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_feedback_to_a_promoted_version(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Chats and comparisons in, rm -> dpo -> gate, the candidate promoted and hot-swapped in."""
    gate = GateSettings(min_win_rate=0.0, max_prompts=8, max_tokens=16)
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False, gate=gate):
        comparisons = collect_feedback(server, tmp_path)
        with admin(server) as api:
            start_cycle(api, ["max_steps=4"])
            loop = wait_for_cycle(api)
            candidate, gate = check_cycle_rows(api, loop, comparisons, 0.0)
            cycle = loop["last_cycle"]
            assert cycle["promoted"] is True and gate["promote"] is True
            assert "clears the bar 0.00" in gate["reason"]
            assert (loop["served_version"], loop["registry_promoted"]) == ("policy-v2",) * 2
            assert candidate["status"] == "promoted"
            assert candidate["status_reason"] == f"gate: {gate['reason']}"
            assert versions_by_id(api)["policy-v1"]["status"] == "retired"

        assert health(server) == "policy-v2"
        client = openai_client(server)
        answer = ask(client)
        streamed = list(ask(client, stream=True))
        assert answer.model == "policy-v2"
        assert {c.model for c in streamed} == {"policy-v2"}
        ids = [int(answer.id), int(streamed[0].id)]
        assert stored_versions(server.data_dir, ids) == dict.fromkeys(ids, "policy-v2")
        history = db_rows(
            server.data_dir,
            "SELECT version_id, previous_version_id, action FROM promotions "
            "WHERE kind = 'policy' ORDER BY id",
        )
        assert history[-1] == ("policy-v2", "policy-v1", "promote")


@pytest.mark.slow
def test_a_candidate_below_the_bar_is_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A bar no win rate can clear: the candidate is rejected with the gate's reason and the
    served version stays."""
    gate = GateSettings(min_win_rate=1.01, max_prompts=8, max_tokens=16)
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False, gate=gate):
        comparisons = collect_feedback(server, tmp_path, prompts=2)
        with admin(server) as api:
            start_cycle(api, ["max_steps=4"])
            loop = wait_for_cycle(api)
            candidate, gate = check_cycle_rows(api, loop, comparisons, 1.01)
            assert loop["last_cycle"]["promoted"] is False and gate["promote"] is False
            assert "is below the bar 1.01" in gate["reason"]
            assert candidate["status"] == "rejected"
            assert candidate["status_reason"] == f"gate: {gate['reason']}"
            assert versions_by_id(api)["policy-v1"]["status"] == "promoted"
            assert (loop["served_version"], loop["registry_promoted"]) == ("policy-v1",) * 2

        assert health(server) == "policy-v1"
        answer = ask(openai_client(server))
        assert answer.model == "policy-v1"
        stored = stored_versions(server.data_dir, [int(answer.id)])
        assert stored == {int(answer.id): "policy-v1"}


def test_promote_and_rollback_under_streams(two_policies: Path) -> None:
    for server in live_server(two_policies, None, ui=False):
        assert health(server) == "policy-v2"
        with admin(server) as api:
            unknown = api.post("/v1/admin/promote", json={"version": "policy-v9"})
            assert unknown.status_code == 404 and "policy-v9" in unknown.json()["error"]["message"]
            again = api.post("/v1/admin/promote", json={"version": "policy-v2"})
            assert again.status_code == 409 and "already" in again.json()["error"]["message"]

            served = ["policy-v2"]
            swaps = []  # (sent, answered, the version served before)
            held = []  # (the models of a stream held open across a swap, the version before)
            with streams_running(server) as log:
                wait_for_answers(log, 3)
                for step in ("promote policy-v1", "promote policy-v2", "rollback"):
                    # One stream is surely in flight: its first chunk is read before the swap
                    # and the rest after it.
                    stream = ask(openai_client(server), "Held open?", stream=True, max_tokens=32)
                    first = next(stream)
                    sent = time.monotonic()
                    if step == "rollback":
                        swapped = api.post("/v1/admin/rollback")
                    else:
                        swapped = api.post("/v1/admin/promote", json={"version": step.split()[1]})
                    swaps.append((sent, time.monotonic(), served[-1]))
                    held.append(({c.model for c in [first, *stream]}, served[-1]))
                    assert swapped.status_code == 200, swapped.text
                    body = swapped.json()
                    assert body["status"] == "promoted"
                    served.append(body["id"])
                    assert health(server) == body["id"]
                    wait_for_answers(log, log.count() + 3)  # some answers on the new version
            assert served == ["policy-v2", "policy-v1", "policy-v2", "policy-v1"]

            # policy-v2 was rolled back from (rejected); nothing earlier is left to go back to.
            nothing = api.post("/v1/admin/rollback")
            assert nothing.status_code == 409
            assert "no earlier policy version" in nothing.json()["error"]["message"]
            versions = versions_by_id(api)
            assert versions["policy-v2"]["status"] == "rejected"
            assert versions["policy-v1"]["status"] == "promoted"
            assert api.get("/v1/admin/loop").json()["served_version"] == "policy-v1"

        assert log.failures == []
        assert len(log.answers) >= 12
        stored = stored_versions(server.data_dir, [a.id for a in log.answers])
        for answer in log.answers:
            assert len(answer.models) == 1, answer  # a stream keeps the version it started on
            assert stored[answer.id] == next(iter(answer.models)), answer
        assert {next(iter(a.models)) for a in log.answers} == {"policy-v1", "policy-v2"}
        # Streams in flight during a whole swap finish on the version they started on: the held
        # ones, and any of the clients' that happened to straddle one.
        straddling = [
            (next(iter(a.models)), old)
            for sent, answered, old in swaps
            for a in log.answers
            if a.started < sent and a.ended > answered
        ]
        assert all(model == old for model, old in straddling), straddling
        assert held == [({old}, old) for _, _, old in swaps]
        assert health(server) == "policy-v1"
        history = db_rows(
            server.data_dir, "SELECT version_id, action FROM promotions ORDER BY id DESC LIMIT 3"
        )
        assert history == [
            ("policy-v1", "rollback"),
            ("policy-v2", "promote"),
            ("policy-v1", "promote"),
        ]


@pytest.mark.slow
def test_a_failing_job_leaves_serving_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False):
        collect_feedback(server, tmp_path, prompts=1)
        with admin(server) as api:
            before = versions_by_id(api)
            start_cycle(api, ["learning_rate=1e30", "max_steps=3"])
            busy = api.post("/v1/admin/train", json={"kind": "rm"})
            assert busy.status_code == 409 and "already running" in busy.json()["error"]["message"]
            # Chat goes on while the job trains.
            assert ask(openai_client(server)).model == "policy-v1"
            loop = wait_for_cycle(api)

            cycle = loop["last_cycle"]
            assert cycle["status"] == "failed"
            assert "training diverged" in cycle["error"], cycle
            runs = runs_by_kind(api)
            assert set(runs) == {"rm", "dpo"}  # no gate for a candidate that never was
            assert runs["rm"]["status"] == "done"
            failed = runs["dpo"]
            assert (failed["status"], failed["stage"]) == ("failed", "failed")
            assert failed["error"] == cycle["error"]
            assert "\n" not in failed["error"] and "lower learning_rate" in failed["error"]
            assert failed["version_id"] == "policy-v2" and ran_for(failed) >= 0, failed
            # No version for it, nothing half-written where it would have gone.
            after = versions_by_id(api)
            assert set(after) - set(before) == {"reward-v1"}
            assert not (server.data_dir.models / "policy-v2").exists()
            assert not (server.data_dir.models / "policy-v2.tmp").exists()
            assert after["policy-v1"]["status"] == "promoted"
            assert (loop["served_version"], loop["registry_promoted"]) == ("policy-v1",) * 2

            # A setting no job takes, or one that would reach outside the job, is refused
            # before anything starts, naming the key.
            for bad, hint in (("max_step=4", "did you mean 'max_steps'?"), ("push_to_hub=1", "")):
                body = {"kind": "rm", "overrides": [bad]}
                refused = api.post("/v1/admin/train", json=body)
                assert refused.status_code == 422 and hint in refused.text
                assert "is not a training setting a job takes" in refused.text
            # A setting the reward model's config lacks fails the job before any step.
            start_cycle(api, ["beta=0.2"], kind="rm")
            cycle = wait_for_cycle(api)["last_cycle"]
            assert cycle["status"] == "failed"
            assert "unknown config key 'beta' for RewardConfig" in cycle["error"]
            assert runs_by_kind(api)["rm"]["error"] == cycle["error"]

        assert health(server) == "policy-v1"
        answer = ask(openai_client(server))
        assert answer.model == "policy-v1" and answer.usage.completion_tokens >= 1
