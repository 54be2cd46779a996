"""`tuneloop gateway` processes for the tests, and asking through them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from live_server import LiveServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway(primary: LiveServer, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tuneloop gateway` in front of `primary` (with `args`), in a process of its own on a free
    port; its URL and process once it answers `/health`."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "tuneloop.cli",
        "gateway",
        "--data-dir",
        str(primary.data_dir.root),
    ]
    argv += ["--primary", primary.url, "--port", str(port), *args]
    log = primary.data_dir.root / f"gateway-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


def ask(url: str, headers: dict[str, str], text: str = "hi") -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()
