"""A gateway and its primary in front of the same real vLLM server (the CPU build, run by the
"operator" and attached with `--vllm-url`): the gateway follows the primary's LoRA promotion and
rollback, loading the adapter the primary loaded already, and answers through it are stored in
the primary's file under the version that gave them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from gateway_client import ask, gateway
from live_server import LiveServer, live_server
from loop_client import admin, stored_versions

from tuneloop.core.config import DataDir, VllmSettings, vllm_python_command
from tuneloop.feedback.registry import ensure_served_policy
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.vllm_server import VllmLaunch, VllmServer

pytestmark = pytest.mark.vllm


def test_a_gateway_follows_the_primarys_lora_promotions_on_a_shared_vllm(
    tmp_path: Path, tiny_model_dir: Path, vllm_python: str
) -> None:
    from tuneloop.train.tiny_model import build_random_lora

    adapter = build_random_lora(tiny_model_dir, tmp_path / "lora")
    dd = DataDir(tmp_path / "data")
    with FeedbackStore(dd.db) as store:
        for model in (adapter, tiny_model_dir):  # policy-v1: the adapter; policy-v2: the base
            ensure_served_policy(store, str(model), str, reason="served by the test")
    cpu = max(os.sched_getaffinity(0))
    launch = VllmLaunch(
        vllm_python_command(vllm_python),
        str(tiny_model_dir),
        dtype="float32",
        max_lora_rank=16,
        cpus=frozenset({cpu}),
    )
    vllm = VllmServer(launch, tmp_path / "operators-vllm")
    vllm.start()
    url = f"unix:{vllm.endpoint.uds}"
    key = vllm.endpoint.api_key or ""
    settings = VllmSettings(urls=(url,), api_key=key, max_lora_rank=16)
    try:
        for primary in live_server(dd.root, None, ui=False, engine="vllm", vllm=settings):
            through_a_gateway(primary, url, key)
    finally:
        vllm.close()


def through_a_gateway(primary: LiveServer, url: str, key: str) -> None:
    """A gateway attached to the same vLLM follows two promotions of the primary."""
    with gateway(primary, "--engine", "vllm", "--vllm-url", url, "--vllm-api-key", key) as (
        address,
        _,
    ):
        ann = primary.account("ann", "user")
        _wait(lambda: _model(address, ann) == "policy-v2", 10)
        asked = []
        for version in ("policy-v1", "policy-v2"):
            with admin(primary) as api:
                r = api.post("/v1/admin/promote", json={"version": version})
                assert r.status_code == 200, r.text
            _wait(lambda v=version: _model(address, ann) == v, 30)
            answer = ask(address, ann, "What is a list?")
            assert answer["model"] == version
            asked.append(answer)
            assert ask(primary.url, ann)["model"] == version
    ids = [int(a["id"]) for a in asked]
    stored = stored_versions(primary.data_dir, ids)
    assert [stored[i] for i in ids] == ["policy-v1", "policy-v2"]


def _model(url: str, headers: dict[str, str]) -> str | None:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    return r.json()["data"][0]["id"] if r.status_code == 200 else None


def _wait(ok: object, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.2)
