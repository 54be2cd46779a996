"""A client's view of a live server, shared by the loop tests on either engine: the admin and
OpenAI clients, stored rows, and streaming clients that keep asking while a test swaps versions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import httpx
import openai
from live_server import LiveServer

from tuneloop.core.config import DataDir


def admin(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.auth, timeout=120)


def openai_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)


def db_rows(dd: DataDir, sql: str, params: list | None = None) -> list[tuple]:
    # Same process as the server: DuckDB shares its database instance, so no lock error.
    with duckdb.connect(str(dd.db)) as con:
        return con.execute(sql, params or []).fetchall()


def stored_versions(dd: DataDir, ids: list[int], timeout: float = 30) -> dict[int, str]:
    """`model_version_id` of stored responses by id. A stream may end before its response is
    committed (the store acknowledges later), so this waits for all of them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = dict(
            db_rows(
                dd,
                "SELECT id, model_version_id FROM responses WHERE list_contains(?, id)",
                [ids],
            )
        )
        if len(rows) == len(set(ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def health(server: LiveServer) -> str:
    body = httpx.get(f"{server.url}/health", timeout=30).json()
    assert body["status"] == "ok"
    return body["model_version"]


def ask(client: openai.OpenAI, text: str = "What is a list?", **kw: Any) -> Any:
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": text}], **kw
    )


@dataclass(frozen=True)
class Streamed:
    id: int
    models: frozenset[str]  # the `model` of each chunk
    started: float  # time.monotonic() at the request and at the last chunk
    ended: float
    prompt: str
    text: str


@dataclass
class StreamLog:
    """What the streaming clients saw: one entry per finished stream, and every failure."""

    answers: list[Streamed] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)


def stream_until(
    server: LiveServer,
    stop: threading.Event,
    log: StreamLog,
    worker: int,
    prompts: Sequence[str] = (),
) -> None:
    """Stream greedy answers back to back until `stop`: to `prompts` in turn, if given."""
    client = openai_client(server)
    n = 0
    while not stop.is_set():
        n += 1
        prompt = prompts[n % len(prompts)] if prompts else f"Worker {worker}, question {n}?"
        started = time.monotonic()
        try:
            chunks = list(ask(client, prompt, stream=True, max_tokens=32, temperature=0.0))
            ids = {c.id for c in chunks}
            assert len(ids) == 1, ids
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            models = frozenset(c.model for c in chunks)
            entry = Streamed(int(ids.pop()), models, started, time.monotonic(), prompt, text)
            with log.lock:
                log.answers.append(entry)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            with log.lock:
                log.failures.append(f"worker {worker}: {exc!r}")


@contextmanager
def streams_running(
    server: LiveServer, workers: int = 3, prompts: Sequence[str] = ()
) -> Iterator[StreamLog]:
    """Streaming clients run in threads while the block runs."""
    log, stop = StreamLog(), threading.Event()
    threads = [
        threading.Thread(target=stream_until, args=(server, stop, log, w, prompts), daemon=True)
        for w in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        yield log
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def wait_for_answers(log: StreamLog, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.count() >= at_least or log.failures:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} streams finished in {timeout} s")
