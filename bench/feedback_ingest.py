"""Benchmark: feedback writes through `POST /v1/feedback` under concurrent clients.

Starts `tuneloop up --no-ui` in a separate process with a tiny random model and a fresh data dir,
creates a few responses to one prompt through `/v1/chat/completions` (so that comparisons and
rankings are valid), then runs `--clients` closed-loop clients for `--warmup` + `--seconds`
seconds. Each client holds one keep-alive HTTP/1.1 connection (raw asyncio streams and
pre-encoded requests: the client shares the machine's cores with the server, so it does as little
as it can) and POSTs feedback of every kind (thumbs, rating, edit, comparison, ranking) one
request after the other; every write must answer 201. Every request signs in with the first
admin's bearer token, as every client of the API must (checked in memory, no database lookup).

Measured over the window after the warm-up: acknowledged writes per second (201s to requests
sent and answered within the window / window length) and the latency of those requests (send to
full response) at p50, p99 and max. Afterwards `GET /v1/feedback/stats` must count exactly the
writes acknowledged over the whole run (warm-up and drain included), per kind. The CPU time of
the server process and of this client over the whole load (from /proc) is printed per
acknowledged write: unlike writes/s, it barely moves when other work takes cores away.

Goal: >= 1,000 writes/s with p99 < 20 ms.

    python bench/feedback_ingest.py [--clients 32] [--seconds 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import HOST, ServerProcess, cpu_seconds, percentile

GOAL_WRITES_PER_S = 1000.0
GOAL_P99_MS = 20.0
STALL_S = 30.0  # the load gives up this long after its window if the server stops answering
KINDS = ("thumbs", "rating", "edit", "comparison", "ranking")
# Share of the requests per kind, in 20ths: 7 thumbs, 4 ratings, 2 edits, 5 comparisons, 2 rankings.
MIX = ("thumbs",) * 7 + ("rating",) * 4 + ("edit",) * 2 + ("comparison",) * 5 + ("ranking",) * 2
PROMPT = [{"role": "user", "content": "Name three uses of a feedback loop."}]


@dataclass
class Tally:
    """What the clients saw; latencies (seconds) only for requests completed in the window."""

    acked: Counter[str] = field(default_factory=Counter)  # 201s per kind, whole run
    errors: Counter[str] = field(default_factory=Counter)  # status or exception name
    window_acked: int = 0
    latencies: list[float] = field(default_factory=list)


def create_responses(url: str, count: int, auth: dict[str, str]) -> list[int]:
    """`count` stored responses to the same prompt (greedy, 4 tokens each); their ids."""
    ids = []
    with httpx.Client(base_url=url, timeout=60.0, headers=auth) as client:
        for _ in range(count):
            r = client.post(
                "/v1/chat/completions",
                json={"messages": PROMPT, "max_tokens": 4, "temperature": 0.0},
            )
            r.raise_for_status()
            ids.append(int(r.json()["id"]))
    return ids


def feedback_bodies(response_ids: list[int], n: int) -> list[tuple[str, bytes]]:
    """`n` feedback bodies cycling through MIX, each naming responses from `response_ids`."""
    ids = response_ids
    k = len(ids)
    bodies = []
    for i in range(n):
        kind = MIX[i % len(MIX)]
        a, b = ids[i % k], ids[(i + 1 + i // k % (k - 1)) % k]
        body: dict[str, object]
        if kind == "thumbs":
            body = {"kind": kind, "response_id": a, "value": 1 if i % 3 else -1}
        elif kind == "rating":
            body = {"kind": kind, "response_id": a, "value": 1 + i % 5, "reason": f"reason {i}"}
        elif kind == "edit":
            body = {"kind": kind, "response_id": a, "text": f"A better answer, take {i}."}
        elif kind == "comparison":
            body = {"kind": kind, "response_ids": [a, b], "winner": ("a", "b", "tie")[i % 3]}
        else:
            body = {"kind": kind, "response_ids": [ids[(i + j) % k] for j in range(k)]}
        bodies.append((kind, json.dumps(body).encode()))
    return bodies


def encode_requests(
    port: int, bodies: list[tuple[str, bytes]], auth: dict[str, str]
) -> list[tuple[str, bytes]]:
    """Whole HTTP/1.1 keep-alive requests, ready to write to a socket, signed in with `auth`."""
    head = (
        f"POST /v1/feedback HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth['Authorization']}\r\n"
    )
    return [
        (kind, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for kind, body in bodies
    ]


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    start = head.lower().find(b"content-length:")
    if start < 0:
        raise ValueError("response without content-length")
    end = head.index(b"\r\n", start)
    await reader.readexactly(int(head[start + 15 : end]))
    return status


async def client(
    port: int,
    requests: list[tuple[str, bytes]],
    offset: int,
    window: tuple[float, float],
    tally: Tally,
) -> None:
    """One connection, one request at a time, until the window's end (perf_counter time)."""
    start, end = window
    reader, writer = await asyncio.open_connection(HOST, port)
    i = offset
    try:
        while (now := time.perf_counter()) < end:
            kind, req = requests[i % len(requests)]
            i += 1
            writer.write(req)
            try:
                status = await read_response(reader)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                tally.errors[type(exc).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                continue
            done = time.perf_counter()
            if status != 201:
                tally.errors[str(status)] += 1
                continue
            tally.acked[kind] += 1
            if now >= start and done <= end:
                tally.window_acked += 1
                tally.latencies.append(done - now)
    finally:
        writer.close()


async def load(
    port: int, requests: list[tuple[str, bytes]], clients: int, warmup: float, seconds: float
) -> Tally:
    """Run the clients through the warm-up and the window; fails after STALL_S more seconds."""
    tally = Tally()
    t0 = time.perf_counter()
    window = (t0 + warmup, t0 + warmup + seconds)
    step = max(1, len(requests) // clients)
    runs = asyncio.gather(
        *(client(port, requests, c * step, window, tally) for c in range(clients))
    )
    await asyncio.wait_for(runs, warmup + seconds + STALL_S)
    return tally


@dataclass
class Usage:
    """CPU seconds used by the server and by this process over `elapsed` seconds of load."""

    elapsed: float
    server_cpu: float
    client_cpu: float


def run(args: argparse.Namespace, model: Path, data_dir: Path) -> int:
    with ServerProcess(model, data_dir / "server") as server:
        response_ids = create_responses(server.url, args.responses, server.auth)
        bodies = feedback_bodies(response_ids, 200)
        requests = encode_requests(server.port, bodies, server.auth)
        before = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
        cpu0 = cpu_seconds(server.pid), cpu_seconds(os.getpid())
        started = time.perf_counter()
        tally = asyncio.run(load(server.port, requests, args.clients, args.warmup, args.seconds))
        usage = Usage(
            time.perf_counter() - started,
            cpu_seconds(server.pid) - cpu0[0],
            cpu_seconds(os.getpid()) - cpu0[1],
        )
        after = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    print(
        f"clients: {args.clients}  window: {args.seconds:g} s after {args.warmup:g} s warm-up  "
        f"responses rated: {len(response_ids)}  cpus: {os.cpu_count()}"
    )
    return report(args, tally, usage, {k: after[k] - before[k] for k in KINDS})


def report(args: argparse.Namespace, tally: Tally, usage: Usage, stored: dict[str, int]) -> int:
    """Print the results; 0 when every write was acknowledged and stored, else 1."""
    lat = sorted(tally.latencies)
    rate = tally.window_acked / args.seconds
    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
    worst = lat[-1] * 1e3 if lat else float("nan")
    n_errors = sum(tally.errors.values())
    acked = sum(tally.acked.values())
    count_ok = all(stored[k] == tally.acked[k] for k in KINDS)
    per_write = 1e6 / max(acked, 1)
    print(
        f"CPU over the load ({usage.elapsed:.1f} s, {acked:,} writes): "
        f"server {usage.server_cpu / usage.elapsed:.2f} cores = "
        f"{usage.server_cpu * per_write:,.0f} us/write, "
        f"client {usage.client_cpu / usage.elapsed:.2f} cores = "
        f"{usage.client_cpu * per_write:,.0f} us/write"
    )
    print()
    print(f"acknowledged writes/s (window): {rate:,.0f}   ({tally.window_acked:,} in window)")
    print(f"latency ms: p50 {p50:.1f}  p99 {p99:.1f}  max {worst:.1f}")
    print(f"errors: {n_errors}" + (f"  {dict(tally.errors)}" if n_errors else ""))
    print()
    print(f"{'kind':<12}{'acked':>10}{'stored':>10}")
    for k in KINDS:
        print(f"{k:<12}{tally.acked[k]:>10,}{stored[k]:>10,}")
    print(f"{'total':<12}{acked:>10,}{sum(stored.values()):>10,}")
    print(f"stats match acknowledged writes: {'yes' if count_ok else 'NO'}")
    print()
    met = rate >= GOAL_WRITES_PER_S and p99 < GOAL_P99_MS and n_errors == 0
    print(
        f"goal: >= {GOAL_WRITES_PER_S:,.0f} writes/s with p99 < {GOAL_P99_MS:.0f} ms, no errors: "
        f"{'met' if met else 'MISSED'} ({rate:,.0f} writes/s, p99 {p99:.1f} ms, "
        f"{n_errors} errors)"
    )
    print(
        f"(closed loop: {args.clients} clients at a mean latency under {GOAL_P99_MS:.0f} ms "
        f"need >= {args.clients / GOAL_P99_MS * 1e3:,.0f} writes/s)"
    )
    return 0 if count_ok and n_errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the window")
    parser.add_argument(
        "--responses", type=int, default=4, help="responses to one prompt to rate (>= 2)"
    )
    parser.add_argument("--model", type=Path, help="model dir (default: a tiny random model)")
    args = parser.parse_args(argv)
    if args.responses < 2:
        parser.error("--responses must be at least 2")
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model
        if model is None:
            from tuneloop.train.tiny_model import build_tiny_model

            model = build_tiny_model(Path(tmp) / "model")
        return run(args, model, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
