"""A gateway and its primary in front of the same real vLLM server (the CPU build, run by the
"operator" and attached with `--vllm-url`): the gateway follows the primary's LoRA promotion and
rollback, loading the adapter the primary loaded already, and answers through it are stored in
the primary's file under the version that gave them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
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
            through_a_gateway(primary, url, key, tmp_path / "gateway.log")
    finally:
        vllm.close()


def through_a_gateway(primary: LiveServer, url: str, key: str, log: Path) -> None:
    """A gateway attached to the same vLLM follows two promotions of the primary."""
    port = _free_port()
    dd = primary.data_dir
    argv = [sys.executable, "-m", "tuneloop.cli", "gateway", "--data-dir", str(dd.root)]
    argv += ["--primary", primary.url, "--port", str(port), "--engine", "vllm"]
    argv += ["--vllm-url", url, "--vllm-api-key", key]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        gateway = f"http://127.0.0.1:{port}"
        _wait(lambda: _up(gateway), 120, log)
        ann = primary.account("ann", "user")
        _wait(lambda: _model(gateway, ann) is not None, 10, log)
        assert _model(gateway, ann) == "policy-v2"
        asked = []
        for version in ("policy-v1", "policy-v2"):
            with admin(primary) as api:
                r = api.post("/v1/admin/promote", json={"version": version})
                assert r.status_code == 200, r.text
            _wait(lambda v=version: _model(gateway, ann) == v, 30, log)
            answer = _ask(gateway, ann)
            assert answer["model"] == version
            asked.append(answer)
            assert _ask(primary.url, ann)["model"] == version
        ids = [int(a["id"]) for a in asked]
        stored = stored_versions(dd, ids)
        assert [stored[i] for i in ids] == ["policy-v1", "policy-v2"]
    finally:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _ask(url: str, headers: dict[str, str]) -> dict:
    body = {"messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 4}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _model(url: str, headers: dict[str, str]) -> str | None:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    return r.json()["data"][0]["id"] if r.status_code == 200 else None


def _wait(ok: object, within_s: float, log: Path) -> None:
    deadline = time.monotonic() + within_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
