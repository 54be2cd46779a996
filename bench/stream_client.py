"""Benchmark: what reading streamed answers costs the gateway's process, httpx against aiohttp.

tuneloop reads every answer from vLLM as a stream of server-sent events over a Unix socket, one
event per token. This runs a stand-in for vLLM's streaming route in a process of its own (uvicorn,
an event shaped like vLLM's chunk every `--event-ms`, 64 of them and `[DONE]` per answer) and
reads answers from it, `--concurrency` at a time, with each client in turn, in this process, on
uvloop as tuneloop's server runs. Reported: this process's CPU ms per answer for each client,
alternating rounds, and the ratio (median of the pairs).

    python bench/stream_client.py [--concurrency 8 32] [--rounds 3] [--event-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop
from common import cpu_seconds

EVENTS = 64
BODY = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
CHUNK = {
    "id": "chatcmpl-0",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "base",
    "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None}],
}

SERVER = """
import asyncio, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

EVENT, EVENTS, PAUSE = sys.argv[2].encode(), int(sys.argv[3]), float(sys.argv[4])

async def chat(request):
    await request.body()

    async def events():
        for _ in range(EVENTS):
            await asyncio.sleep(PAUSE)
            yield EVENT
        yield b"data: [DONE]\\n\\n"

    return StreamingResponse(events(), media_type="text/event-stream")

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
uvicorn.run(app, uds=sys.argv[1], log_level="warning")
"""

Reader = Callable[[str, int, int], Awaitable[int]]


async def drive(answer: Callable[[], Awaitable[int]], answers: int, concurrency: int) -> int:
    """`answers` answers, `concurrency` at a time; the events read."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with gate:
            return await answer()

    return sum(await asyncio.gather(*(one() for _ in range(answers))))


async def with_httpx(sock: str, answers: int, concurrency: int) -> int:
    """As tuneloop's engine read vLLM before: httpx.AsyncClient, `aiter_raw`."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2)
    transport = httpx.AsyncHTTPTransport(uds=sock, limits=limits)
    async with httpx.AsyncClient(base_url="http://vllm", transport=transport, timeout=None) as c:

        async def answer() -> int:
            request = c.build_request("POST", "/v1/chat/completions", json=BODY)
            r = await c.send(request, stream=True)
            data = b"".join([part async for part in r.aiter_raw()])
            await r.aclose()
            return data.count(b"\n\n")

        return await drive(answer, answers, concurrency)


async def with_aiohttp(sock: str, answers: int, concurrency: int) -> int:
    """As tuneloop's engine reads vLLM now: aiohttp, `content.iter_any`."""
    connector = aiohttp.UnixConnector(path=sock, limit=0, keepalive_timeout=2)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def answer() -> int:
            async with session.post("http://vllm/v1/chat/completions", json=BODY) as r:
                data = b"".join([part async for part in r.content.iter_any()])
            return data.count(b"\n\n")

        return await drive(answer, answers, concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--event-ms", type=float, default=10.0)
    args = parser.parse_args(argv)
    event = f"data: {json.dumps(CHUNK)}\n\n"
    clients: dict[str, Reader] = {"httpx": with_httpx, "aiohttp": with_aiohttp}
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "sse.sock")
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, sock, event, str(EVENTS), str(args.event_ms / 1e3)]
        )
        try:
            while not os.path.exists(sock):
                time.sleep(0.1)
            for concurrency in args.concurrency:
                answers = 4 * concurrency
                costs: dict[str, list[float]] = {name: [] for name in clients}
                for _ in range(args.rounds):
                    for name, read in clients.items():
                        before = cpu_seconds(os.getpid())
                        events = uvloop.run(read(sock, answers, concurrency))
                        if events != answers * (EVENTS + 1):
                            raise RuntimeError(f"{name} read {events} events")
                        costs[name].append((cpu_seconds(os.getpid()) - before) / answers * 1e3)
                shown = "  ".join(
                    f"{name} {statistics.median(ms):.2f} ({', '.join(f'{m:.2f}' for m in ms)})"
                    for name, ms in costs.items()
                )
                ratio = statistics.median(
                    a / h for a, h in zip(costs["aiohttp"], costs["httpx"], strict=True)
                )
                print(
                    f"concurrency {concurrency}: CPU ms per answer of {EVENTS} events: {shown}; "
                    f"aiohttp/httpx {ratio:.2f}"
                )
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
