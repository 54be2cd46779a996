"""SmolLM2-135M-Instruct served on each engine: sensible greedy answers through the API, and a
LoRA policy over it hot-swapped in and rolled back while answers stream, none failing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer, live_server
from loop_client import (
    admin,
    ask,
    health,
    openai_client,
    stored_versions,
    streams_running,
    wait_for_answers,
)

from tuneloop.core.config import DataDir, VllmSettings, vllm_python_command
from tuneloop.core.cpu_affinity import run_on
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.real_model

# Greedy answers of SmolLM2-135M-Instruct must contain these words.
FACTS = {
    "What is the capital of France?": "Paris",
    "How do I reverse a list in Python?": "[::-1]",
    "What is 2 + 2?": "4",
}


@pytest.fixture(scope="module", params=["embedded", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> Iterator[LiveServer]:
    """policy-v1: a LoRA adapter over SmolLM2 (retired); policy-v2: SmolLM2 itself, served."""
    from tuneloop.train.tiny_model import build_random_lora

    tmp = tmp_path_factory.mktemp(f"smollm2-{request.param}")
    lora = build_random_lora(smollm2_dir, tmp / "lora")
    dd = DataDir(tmp / "data")
    store = FeedbackStore(dd.db)
    try:
        for model in (lora, smollm2_dir):
            ensure_served_policy(store, str(model), str, reason="served by the test")
    finally:
        store.close()
    if request.param == "embedded":
        yield from live_server(dd.root, None, ui=False)
        return
    allowed = frozenset(os.sched_getaffinity(0))
    settings = VllmSettings(
        command=vllm_python_command(request.getfixturevalue("vllm_python")),
        max_model_len=2048,
        max_lora_rank=16,
        dtype="float32",
        cpus=(frozenset({min(allowed)}),),  # as the README advises on a small machine
    )
    try:
        yield from live_server(dd.root, None, ui=False, engine="vllm", vllm=settings)
    finally:
        run_on(allowed)


def greedy(server: LiveServer, prompt: str, max_tokens: int = 48) -> str:
    reply = ask(openai_client(server), prompt, max_tokens=max_tokens, temperature=0.0)
    return reply.choices[0].message.content


def test_greedy_answers_to_factual_questions_are_right(server: LiveServer) -> None:
    assert health(server) == "policy-v2"
    for question, word in FACTS.items():
        answer = greedy(server, question)
        assert word in answer, (question, answer)


def test_a_lora_policy_swaps_in_and_rolls_back_while_answers_stream(server: LiveServer) -> None:
    question = "What is the capital of France?"
    base_answer = greedy(server, question, 16)
    prompts = list(FACTS)
    with streams_running(server, workers=3, prompts=prompts) as log:
        wait_for_answers(log, 2, timeout=120)
        with admin(server) as api:
            r = api.post("/v1/admin/promote", json={"version": "policy-v1"})
            assert r.status_code == 200, r.text
        wait_for_answers(log, log.count() + 3, timeout=120)
        assert health(server) == "policy-v1"
        adapter_answer = greedy(server, question, 16)
        with admin(server) as api:
            r = api.post("/v1/admin/rollback")
            assert r.status_code == 200, r.text
        wait_for_answers(log, log.count() + 3, timeout=120)
    assert health(server) == "policy-v2"
    assert adapter_answer != base_answer  # the adapter answers, not the base
    assert greedy(server, question, 16) == base_answer
    assert log.failures == []
    stored = stored_versions(server.data_dir, [a.id for a in log.answers])
    for a in log.answers:
        [model] = a.models  # one version per stream
        assert stored[a.id] == model
    assert {next(iter(a.models)) for a in log.answers} == {"policy-v1", "policy-v2"}
