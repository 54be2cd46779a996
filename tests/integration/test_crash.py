"""Every acknowledged feedback row survives a crash (SIGKILL) of the server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx

from tuneloop.feedback.store import FeedbackStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "up",
            "--no-ui",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up in 120 s")


def test_acknowledged_rows_survive_sigkill(tmp_path: Path, tiny_model_dir: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    proc = start_server(data_dir, tiny_model_dir, port)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {(data_dir / 'admin.token').read_text().strip()}"}
    try:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
            headers=auth,
        ).json()
        rid = int(chat["id"])

        def rate(i: int) -> int | None:
            try:
                resp = httpx.post(
                    f"{url}/v1/feedback",
                    timeout=5,
                    json={"kind": "rating", "response_id": rid, "value": 1 + i % 5},
                    headers=auth,
                )
            except httpx.TransportError:
                return None  # the server died before answering: not acknowledged
            return resp.json()["id"] if resp.status_code == 201 else None

        with ThreadPoolExecutor(8) as pool:
            first = [f for f in pool.map(rate, range(200)) if f is not None]
            # Kill the server while more writes are in flight.
            late = [pool.submit(rate, i) for i in range(400)]
            # Once one has come back the others are in flight or queued behind it.
            assert wait(late, timeout=30, return_when=FIRST_COMPLETED).done
            os.kill(proc.pid, signal.SIGKILL)
            acked = first + [f.result() for f in late if f.result() is not None]
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(first) == 200
    assert 200 < len(acked) < 600  # the kill came with late writes acknowledged and some not
    with FeedbackStore(data_dir / "feedback.duckdb") as store:
        stored = {r["id"] for r in store.read("SELECT id FROM ratings")}
        answer = store.response(rid)
    assert answer is not None
    assert (answer["text"], answer["model_version_id"]) == (
        chat["choices"][0]["message"]["content"],
        chat["model"],
    )
    assert answer["completion_tokens"] == chat["usage"]["completion_tokens"]
    assert set(acked) <= stored, f"lost {len(set(acked) - stored)} acknowledged rows"
