"""tuneloop serving from the real vLLM (the CPU build, in its own environment): chat and feedback
through tuneloop's API, LoRA and merged-weights swaps and a rollback under concurrent streams, the
vLLM admin routes out of reach, and the supervisor bringing a killed vLLM back.

One vLLM server for the module (it takes ~30 s to start); the tests run in file order."""

from __future__ import annotations

import contextlib
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
    db_rows,
    health,
    openai_client,
    stored_versions,
    streams_running,
    wait_for_answers,
)

from tuneloop.core.config import DataDir, VllmSettings, vllm_python_command
from tuneloop.core.cpu_affinity import run_on
from tuneloop.core.records import ModelVersion
from tuneloop.feedback.registry import ensure_served_policy, register_version
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.vllm_server import VllmEndpoint, VllmError, VllmLaunch, VllmServer

pytestmark = pytest.mark.vllm

PROMPTS = ("What is a list?", "Tell me about loops.", "How do files work?", "Why use sets?")
# vLLM routes that change what it serves; none may be reachable through tuneloop's port.
VLLM_ADMIN_ROUTES = (
    "/collective_rpc",
    "/pause",
    "/resume",
    "/update_weights",
    "/start_weight_update",
    "/finish_weight_update",
    "/reset_prefix_cache",
    "/sleep",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)


@pytest.fixture(scope="module")
def lora_policy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter over the tiny model with random (not zero) B matrices: other answers."""
    from tuneloop.train.tiny_model import build_random_lora

    return build_random_lora(tiny_model_dir, tmp_path_factory.mktemp("lora-policy"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
    lora_policy: Path,
    vllm_python: str,
) -> Iterator[LiveServer]:
    """policy-v1: other full weights (a merged swap); policy-v2: a LoRA adapter over the base;
    policy-v3: the base itself, served first; policy-v4: weights of another shape, which vLLM
    cannot load over the base."""
    from tuneloop.train.tiny_model import build_tiny_model

    other_shape = build_tiny_model(tmp_path_factory.mktemp("other-shape"), hidden_size=128)
    dd = DataDir(tmp_path_factory.mktemp("vllm") / "data")
    store = FeedbackStore(dd.db)
    try:
        for model in (tiny_model_dir_b, lora_policy, tiny_model_dir):
            ensure_served_policy(store, str(model), str, reason="served by the test")
        broken = ModelVersion("policy-v4", "policy", str(tiny_model_dir), str(other_shape))
        register_version(store, broken)
    finally:
        store.close()
    # vLLM on one CPU, tuneloop (this process) on the others: `--vllm-cpus`, as the README advises
    # on a small machine. Unpinned on 2 cores, vLLM's engine left other processes without CPU
    # for up to 2.7 s while it generated, and the first text of a 400-token answer often came
    # only at its end (bench/vllm_stalls.py).
    allowed = frozenset(os.sched_getaffinity(0))
    settings = VllmSettings(
        command=vllm_python_command(vllm_python),
        max_lora_rank=16,
        dtype="float32",
        cpus=(frozenset({min(allowed)}),),
    )
    try:
        yield from live_server(dd.root, None, ui=False, engine="vllm", vllm=settings)
    finally:
        run_on(allowed)  # the tests after these get every CPU back


def promote(server: LiveServer, version: str) -> None:
    with admin(server) as api:
        r = api.post("/v1/admin/promote", json={"version": version})
        assert r.status_code == 200, r.text


def answers(server: LiveServer) -> dict[str, str]:
    """The served version's greedy answer to each prompt, asked one at a time."""
    client = openai_client(server)
    return {
        p: ask(client, p, max_tokens=32, temperature=0.0).choices[0].message.content
        for p in PROMPTS
    }


def test_chat_and_feedback_through_tuneloop(server: LiveServer) -> None:
    assert health(server) == "policy-v3"
    client = openai_client(server)
    answer = ask(client, "What is a list?", max_tokens=12)
    assert answer.model == "policy-v3" and answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
    chunks = list(
        ask(client, "What is a list?", stream=True, stream_options={"include_usage": True})
    )
    assert {c.model for c in chunks} == {"policy-v3"} and len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and chunks[-1].usage.completion_tokens > 0
    ids = [int(answer.id), int(chunks[0].id)]

    feedback = [
        {"response_id": ids[0], "kind": "thumbs", "value": 1},
        {"response_id": ids[1], "kind": "rating", "value": 4, "reason": "clear"},
        {"kind": "comparison", "response_ids": ids, "winner": "b"},
    ]
    for body in feedback:
        r = httpx.post(f"{server.url}/v1/feedback", json=body, headers=server.auth, timeout=30)
        assert r.status_code == 201, r.text
    bad = httpx.post(
        f"{server.url}/v1/feedback",
        json={"response_id": 10**9, "kind": "thumbs", "value": 1},
        headers=server.auth,
    )
    assert bad.status_code == 404
    assert stored_versions(server.data_dir, ids) == dict.fromkeys(ids, "policy-v3")
    [(text,)] = db_rows(server.data_dir, "SELECT text FROM responses WHERE id = ?", [ids[1]])
    assert text == streamed
    too_long = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "word " * 2000}]},
        headers=server.auth,
        timeout=30,
    )
    assert too_long.status_code == 400 and "at most 512" in too_long.text


def _vllm_metric(server: LiveServer, name: str) -> float:
    """A series from vLLM's own /metrics (no key needed), summed over its labels."""
    keyless = VllmEndpoint("http://vllm", None, str(server.data_dir.root / "vllm/sock/vllm.sock"))
    with keyless.client() as c:
        lines = c.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def _settled_generation_tokens(server: LiveServer) -> float:
    """vLLM's count of generated tokens once nothing runs and it stopped moving: its metrics
    trail the answers by up to a second."""
    deadline, last = time.monotonic() + 30, -1.0
    while True:
        count = _vllm_metric(server, "vllm:generation_tokens_total")
        running = _vllm_metric(server, "vllm:num_requests_running")
        if count == last and not running:
            return count
        assert time.monotonic() < deadline, "vLLM's generated-token count does not settle"
        last = count
        time.sleep(1.0)


def _stored_responses(server: LiveServer) -> int:
    [(count,)] = db_rows(server.data_dir, "SELECT count(*) FROM responses")
    return count


def test_a_client_that_leaves_mid_answer_stops_its_generation(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me about loops."}],
        "max_tokens": 400,
        "temperature": 0.0,
    }
    started = time.monotonic()
    whole = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers=server.auth, timeout=120
    ).json()
    took = time.monotonic() - started
    assert whole["choices"][0]["finish_reason"] == "length"  # it runs all 400 tokens
    generated, before = _settled_generation_tokens(server), _stored_responses(server)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body | {"stream": True},
        headers=server.auth,
        timeout=60,
    ) as r:
        events = r.iter_lines()
        while "content" not in next(events):  # the first text came; then the client goes
            pass
    first_text_s = time.monotonic() - started
    time.sleep(2 * took)  # an answer left running would be done by then
    extra = _settled_generation_tokens(server) - generated
    # Which side kept going, if one did: tuneloop stores an answer only once it read it whole.
    stored = _stored_responses(server) > before
    assert extra < 200, (
        f"vLLM generated {extra:.0f} more tokens; tuneloop read them all: {stored}; the first "
        f"text came after {first_text_s:.2f} s of the whole answer's {took:.2f} s"
    )


def test_vllm_admin_routes_are_out_of_reach(server: LiveServer) -> None:
    for route in VLLM_ADMIN_ROUTES:
        for method in ("GET", "POST"):
            r = httpx.request(method, f"{server.url}{route}", json={}, timeout=10)
            assert r.status_code in (404, 405), (method, route, r.status_code)
    models = httpx.get(f"{server.url}/v1/models", headers=server.auth).json()["data"]
    assert [m["id"] for m in models] == ["policy-v3"]

    # vLLM listens on a Unix socket in a directory only this user may enter, and on no TCP
    # port that speaks HTTP; its /v1 routes want the key tuneloop generated.
    run_dir = server.data_dir.root / "vllm"
    sock_dir = run_dir / "sock"
    assert (sock_dir / "vllm.sock").is_socket()
    assert sock_dir.stat().st_mode & 0o777 == 0o700
    pid = int((run_dir / "vllm.pid").read_text())
    for port in listening_tcp_ports(os.getpgid(pid)):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
    keyless = VllmEndpoint("http://vllm", None, str(sock_dir / "vllm.sock"))
    with keyless.client() as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_lora_and_merged_swaps_and_rollback_under_streams(server: LiveServer) -> None:
    reference = {"policy-v3": answers(server)}
    for version in ("policy-v2", "policy-v1", "policy-v3"):  # LoRA, merged, back to the base
        promote(server, version)
        reference[version] = answers(server)
    assert len({tuple(r.values()) for r in reference.values()}) == 3, "versions answer alike"

    served = ["policy-v3"]
    with streams_running(server, workers=4, prompts=PROMPTS) as log:
        wait_for_answers(log, 4)
        for step in ("policy-v2", "policy-v1", "rollback", "policy-v3"):
            with admin(server) as api:
                if step == "rollback":
                    r = api.post("/v1/admin/rollback")  # policy-v1 -> policy-v2
                else:
                    r = api.post("/v1/admin/promote", json={"version": step})
            assert r.status_code == 200, r.text
            served.append(r.json()["id"])
            wait_for_answers(log, log.count() + 4)
    assert served == ["policy-v3", "policy-v2", "policy-v1", "policy-v2", "policy-v3"]

    assert log.failures == []
    stored = stored_versions(server.data_dir, [a.id for a in log.answers])
    for a in log.answers:
        [model] = a.models  # one version per stream
        assert stored[a.id] == model
        assert a.text == reference[model][a.prompt], (model, a.prompt)  # no mixed answer
    assert {next(iter(a.models)) for a in log.answers} == {"policy-v1", "policy-v2", "policy-v3"}


def test_a_lora_canary_answers_its_share_beside_the_served_version(server: LiveServer) -> None:
    """The human gate on vLLM: a LoRA candidate loaded beside the served base on the same vLLM
    server answers its share of conversations, each stored under the version that answered;
    full weights of their own cannot be a canary; after the canary stops, one version again."""
    if httpx.get(f"{server.url}/health").json()["model_version"] != "policy-v3":
        promote(server, "policy-v3")  # the base
    with admin(server) as api:
        refused = api.post("/v1/admin/canary", json={"version": "policy-v4"})  # full weights
        assert refused.status_code in (409, 500) and "LoRA" in refused.text
        started = api.post("/v1/admin/canary", json={"version": "policy-v2", "share": 0.5})
        assert started.status_code == 201, started.text
    client = openai_client(server)
    replies = [ask(client, p, max_tokens=4) for p in PROMPTS * 8]
    answered = [r.model for r in replies]
    assert set(answered) == {"policy-v2", "policy-v3"}
    assert 0.25 <= answered.count("policy-v2") / len(answered) <= 0.75
    stored = stored_versions(server.data_dir, [int(r.id) for r in replies])
    assert [stored[int(r.id)] for r in replies] == answered
    with admin(server) as api:
        assert api.post("/v1/admin/canary/stop", json={}).status_code == 200
    assert {ask(client, p, max_tokens=4).model for p in PROMPTS * 4} == {"policy-v3"}


def test_a_version_vllm_cannot_load_leaves_serving_alone(server: LiveServer) -> None:
    served, before = health(server), answers(server)
    with admin(server) as api:
        r = api.post("/v1/admin/promote", json={"version": "policy-v4"})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["message"].startswith("loading policy-v4 failed")
        assert f"{served} is still served" in r.json()["error"]["message"]
        versions = {v["id"]: v["status"] for v in api.get("/v1/admin/versions").json()}
    assert versions[served] == "promoted" and versions["policy-v4"] == "candidate"
    assert health(server) == served
    assert answers(server) == before


def test_a_killed_vllm_comes_back_serving_the_same_version(server: LiveServer) -> None:
    promote(server, "policy-v2")  # an adapter: it must be loaded again after the restart
    before = answers(server)
    run_dir = server.data_dir.root / "vllm"
    pid = int((run_dir / "vllm.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    assert health_status_becomes(server, 503, within_s=30)  # the supervisor noticed
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        restarted = (run_dir / "vllm.pid").read_text().strip() != str(pid)
        if restarted:
            try:
                after = answers(server)
                break
            except Exception:  # noqa: BLE001 - not ready yet: 503 until vLLM is back
                pass
        time.sleep(1)
    else:
        raise AssertionError("vLLM did not come back within 240 s")
    assert after == before
    assert health_status_becomes(server, 200, within_s=5)
    assert health(server) == "policy-v2"
    assert "restarting" in (run_dir / "vllm.log").read_text()


def health_status_becomes(server: LiveServer, status: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/health", timeout=10).status_code == status:
            return True
        time.sleep(0.2)
    return False


def _process_group(pgid: int | None) -> list[int]:
    pids = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.getpgid(pid) == pgid:
                pids.append(pid)
    return pids


def listening_tcp_ports(pgid: int) -> set[int]:
    """TCP ports the processes of group `pgid` listen on (from /proc)."""
    inodes: set[str] = set()
    for pid in _process_group(pgid):
        with contextlib.suppress(OSError):  # gone meanwhile
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_attach_to_a_vllm_the_operator_runs(
    tiny_model_dir: Path, vllm_python: str, tmp_path: Path
) -> None:
    """`--vllm-url` with its key: tuneloop serves from it and leaves it running on exit; a wrong
    key stops tuneloop at start with vLLM's answer. This vLLM runs pinned to one CPU
    (`--vllm-cpus`), as do the engine and worker processes it starts."""
    cpu = max(os.sched_getaffinity(0))
    launch = VllmLaunch(
        vllm_python_command(vllm_python), str(tiny_model_dir), cpus=frozenset({cpu})
    )
    vllm = VllmServer(launch, tmp_path / "operators-vllm")
    vllm.start()
    try:
        group = _process_group(vllm.pid)
        assert len(group) >= 3  # the API server, its engine core and a worker
        assert all(os.sched_getaffinity(p) == {cpu} for p in group)
        url = f"unix:{vllm.endpoint.uds}"
        wrong = VllmSettings(urls=(url,), api_key="not-the-key")
        with pytest.raises(VllmError, match="401"):
            next(
                live_server(tmp_path / "wrong", tiny_model_dir, ui=False, engine="vllm", vllm=wrong)
            )
        right = VllmSettings(urls=(url,), api_key=vllm.endpoint.api_key)
        for server in live_server(
            tmp_path / "data", tiny_model_dir, ui=False, engine="vllm", vllm=right
        ):
            answer = ask(openai_client(server), "What is a list?", max_tokens=8)
            assert answer.model == health(server) == "policy-v1"
            assert stored_versions(server.data_dir, [int(answer.id)]) == {
                int(answer.id): "policy-v1"
            }
        assert vllm.endpoint.healthy()  # not tuneloop's to stop
    finally:
        vllm.close()
