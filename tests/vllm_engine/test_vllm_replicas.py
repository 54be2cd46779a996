"""Two real vLLM replicas (the CPU build, each on a CPU of its own) behind one tuneloop server:
answers spread over both, a promotion switches both at once under 8 streams with no failed
request and no answer from two versions, and a replica killed while a promotion starts aborts
it with nothing switched and no failed request (its answers go on from the other replica).

Starting two vLLM servers takes a minute or two on 2 cores; the tests run in file order."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server
from loop_client import (
    admin,
    ask,
    openai_client,
    stored_versions,
    streams_running,
    wait_for_answers,
)

from tuneloop.core.config import DataDir, VllmSettings, vllm_python_command
from tuneloop.core.cpu_affinity import run_on
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.vllm

BASE = "policy-v4"
PROMPTS = ("What is a list?", "Tell me about loops.", "How do files work?", "Why use sets?")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
    vllm_python: str,
) -> Iterator[LiveServer]:
    """policy-v1 and policy-v2: two LoRA adapters over the base; policy-v3: other full weights;
    policy-v4: the base, served first by two replicas."""
    from tuneloop.train.tiny_model import build_random_lora

    dd = DataDir(tmp_path_factory.mktemp("replicas") / "data")
    adapters = [
        build_random_lora(tiny_model_dir, tmp_path_factory.mktemp(f"lora-{seed}"), seed=seed)
        for seed in (1, 2)
    ]
    store = FeedbackStore(dd.db)
    try:
        for model in (*adapters, tiny_model_dir_b, tiny_model_dir):
            ensure_served_policy(store, str(model), str, reason="served by the test")
    finally:
        store.close()
    allowed = sorted(os.sched_getaffinity(0))
    settings = VllmSettings(
        command=vllm_python_command(vllm_python),
        replicas=2,
        max_lora_rank=16,
        dtype="float32",
        cpus=(frozenset({allowed[0]}), frozenset({allowed[-1]})),
    )
    try:
        yield from live_server(dd.root, None, ui=False, engine="vllm", vllm=settings)
    finally:
        run_on(frozenset(allowed))


def engine_state(server: LiveServer) -> dict:
    with admin(server) as api:
        r = api.get("/v1/admin/engine")
        assert r.status_code == 200, r.text
        return r.json()


def answered(server: LiveServer, version: str) -> list[int]:
    """How many answers each replica has given from `version`."""
    return [row["answered"].get(version, 0) for row in engine_state(server)["replicas"]]


def greedy(server: LiveServer) -> dict[str, str]:
    client = openai_client(server)
    return {
        p: ask(client, p, max_tokens=32, temperature=0.0).choices[0].message.content
        for p in PROMPTS
    }


def promote(server: LiveServer, version: str) -> httpx.Response:
    with admin(server) as api:
        return api.post("/v1/admin/promote", json={"version": version})


def test_answers_spread_over_both_replicas(server: LiveServer) -> None:
    state = engine_state(server)
    assert state["version"] == BASE
    assert [r["up"] for r in state["replicas"]] == [True, True]
    client = openai_client(server)
    with streams_running(server, workers=4, prompts=PROMPTS) as log:
        wait_for_answers(log, 16)
    assert log.failures == []
    assert all(n > 0 for n in answered(server, BASE)), engine_state(server)
    assert ask(client).model == BASE


def test_a_promotion_switches_both_replicas_at_once_under_8_streams(server: LiveServer) -> None:
    reference = {BASE: greedy(server)}
    for version in ("policy-v1", BASE):
        assert promote(server, version).status_code == 200
        reference[version] = greedy(server)
    assert reference["policy-v1"] != reference[BASE], "the adapter answers as the base"

    before = answered(server, "policy-v1")
    with streams_running(server, workers=8, prompts=PROMPTS) as log:
        wait_for_answers(log, 16)
        r = promote(server, "policy-v1")
        assert r.status_code == 200, r.text
        switched = time.monotonic()
        wait_for_answers(log, log.count() + 24)
    assert log.failures == []
    stored = stored_versions(server.data_dir, [a.id for a in log.answers])
    for a in log.answers:
        [model] = a.models  # one version per answer
        assert stored[a.id] == model
        assert a.text == reference[model][a.prompt], (model, a.prompt)  # not a mix
        if a.started > switched:
            assert model == "policy-v1", "an answer begun after the switch came from the old one"
    after = answered(server, "policy-v1")
    assert all(n > b for n, b in zip(after, before, strict=True)), (before, after)


def test_a_replica_killed_as_a_promotion_starts_aborts_it(server: LiveServer) -> None:
    """Replica 1's vLLM dies just before a promotion: the promotion is aborted with nothing
    switched, the answers it was giving go on from replica 0, and once it is back (restarted by
    tuneloop, serving the current version) the promotion goes through on both."""
    served = engine_state(server)["version"]
    target = "policy-v2" if served != "policy-v2" else "policy-v1"
    run_dir = server.data_dir.root / "vllm" / "replica-1"
    pid = int((run_dir / "vllm.pid").read_text())
    with streams_running(server, workers=8, prompts=PROMPTS) as log:
        wait_for_answers(log, 16)
        os.killpg(pid, signal.SIGKILL)
        r = promote(server, target)
        wait_for_answers(log, log.count() + 16)
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert "replica 1" in message and "aborted" in message
    assert f"{served} is still served" in message
    assert log.failures == []
    stored = stored_versions(server.data_dir, [a.id for a in log.answers])
    for a in log.answers:
        assert a.models == {served} and stored[a.id] == served
    state = engine_state(server)
    assert state["version"] == served
    assert state["replicas"][1]["taken_over"] > 0, "no answer was in flight on replica 1"

    deadline = time.monotonic() + 300
    while not all(r["up"] for r in engine_state(server)["replicas"]):
        assert time.monotonic() < deadline, "replica 1 did not come back within 300 s"
        time.sleep(1)
    assert (run_dir / "vllm.pid").read_text().strip() != str(pid)
    before = answered(server, target)
    assert promote(server, target).status_code == 200
    with streams_running(server, workers=8, prompts=PROMPTS) as log:
        wait_for_answers(log, 24)
    assert log.failures == []
    assert {m for a in log.answers for m in a.models} == {target}
    after = answered(server, target)
    assert all(n > b for n, b in zip(after, before, strict=True)), (before, after)


def test_merged_weights_swap_on_both_replicas_and_rollback(server: LiveServer) -> None:
    """Full weights: new answers wait, those in flight finish, both replicas reload, then the
    waiting answers go; a rollback the same way back."""
    if engine_state(server)["version"] != BASE:
        assert promote(server, BASE).status_code == 200
    reference = {BASE: greedy(server)}
    assert promote(server, "policy-v3").status_code == 200
    reference["policy-v3"] = greedy(server)
    assert promote(server, BASE).status_code == 200
    assert reference["policy-v3"] != reference[BASE]
    with streams_running(server, workers=8, prompts=PROMPTS) as log:
        wait_for_answers(log, 16)
        assert promote(server, "policy-v3").status_code == 200
        wait_for_answers(log, log.count() + 16)
        with admin(server) as api:
            r = api.post("/v1/admin/rollback")
        assert r.status_code == 200 and r.json()["id"] == BASE, r.text
        wait_for_answers(log, log.count() + 16)
    assert log.failures == []
    for a in log.answers:
        [model] = a.models
        assert a.text == reference[model][a.prompt], (model, a.prompt)
    assert {m for a in log.answers for m in a.models} == {BASE, "policy-v3"}
    assert all(n > 0 for n in answered(server, "policy-v3"))


def test_a_canary_answers_its_share_from_both_replicas(server: LiveServer) -> None:
    assert engine_state(server)["version"] == BASE
    with admin(server) as api:
        r = api.post("/v1/admin/canary", json={"version": "policy-v2", "share": 0.5})
        assert r.status_code == 201, r.text
    client = openai_client(server)
    replies = [ask(client, p, max_tokens=4) for p in PROMPTS * 8]
    answered_by = [r.model for r in replies]
    assert 0.25 <= answered_by.count("policy-v2") / len(answered_by) <= 0.75
    assert engine_state(server)["canary"] == "policy-v2"
    assert all(n > 0 for n in answered(server, "policy-v2"))
    with admin(server) as api:
        assert api.post("/v1/admin/canary/stop", json={}).status_code == 200
    assert {ask(client, p, max_tokens=4).model for p in PROMPTS * 2} == {BASE}
