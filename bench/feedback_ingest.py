"""Benchmark: feedback writes through `POST /v1/feedback` under concurrent clients.

Starts `tuneloop up --no-ui` in a separate process with a tiny random model and a fresh data dir
in which each of the `--clients` closed-loop clients has a rater account and `--answers` stored
answers to one prompt (so that its thumbs, ratings and edits are on its own answers and its
comparisons and rankings valid), then runs the clients for `--warmup` + `--seconds` seconds.
Each client holds one keep-alive HTTP/1.1 connection (raw asyncio streams and pre-encoded
requests: the client shares the machine's cores with the server, so it does as little as it
can), signs in with its account's bearer token, and POSTs feedback of every kind (thumbs, rating,
edit, comparison, ranking) one request after the other, each a vote on an item of its own (one
vote per rater and item: a repeat would replace a row); every write must answer 201.

Measured over the window after the warm-up: acknowledged writes per second (201s to requests
sent and answered within the window / window length) and the latency of those requests (send to
full response) at p50, p99 and max. Afterwards `GET /v1/feedback/stats` must count exactly the
distinct votes acknowledged over the whole run (warm-up and drain included), per kind. The CPU
time of the server process and of this client over the whole load (from /proc) is printed per
acknowledged write: unlike writes/s, it barely moves when other work takes cores away.

Goal: >= 1,000 writes/s with p99 < 20 ms.

With `--gateways N` the clients are spread over N `tuneloop gateway` processes in front of the
server, which record into its store (README: several gateways). With `--kill-after S` the first
gateway gets SIGKILL S seconds into the load; its clients go on through the next one. Goal: >=
1,000 acknowledged writes/s with 32 clients over 2 gateways, and 0 lost: afterwards every vote
acknowledged to a client is looked up in the DuckDB file.

The per-rater feedback limit is off by default (the store's ingest is measured). With
`--feedback-per-minute 0 N` the whole run is repeated with the limit at each value, one after
the other, and the writes/s of each printed as a ratio to the first: a limit too high to refuse
anything measures what counting it costs (through gateways, one round trip to the primary's
bucket per write).

    python bench/feedback_ingest.py [--clients 32] [--seconds 10] [--warmup 2]
        [--gateways 2 [--kill-after 6]] [--feedback-per-minute 0 100000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx
from common import HOST, ServerProcess, cpu_seconds, free_port, percentile, wait_healthy

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
    # (client, item) of each 201 per kind: a vote on the same item again replaced it.
    votes: dict[str, set[tuple[int, str]]] = field(default_factory=lambda: defaultdict(set))
    errors: Counter[str] = field(default_factory=Counter)  # status or exception name
    moved: int = 0  # clients that went on through another gateway
    window_acked: int = 0
    latencies: list[float] = field(default_factory=list)


def prepare(data_dir: Path, clients: int, answers: int) -> list[tuple[str, list[int]]]:
    """Before the server starts: one rater account per client, each with `answers` stored
    answers to the same prompt written straight to the store (a feedback benchmark needs
    answers to judge, not the time to generate them). Returns each client's token and ids."""
    from tuneloop.core.records import Message, Response, SamplingParams
    from tuneloop.feedback.accounts import add_account
    from tuneloop.feedback.store import FeedbackStore

    prompt = tuple(Message(m["role"], m["content"]) for m in PROMPT)
    out = []
    with FeedbackStore(data_dir / "feedback.duckdb") as store:
        for k in range(clients):
            name = f"bench-{k}"
            token = add_account(store, name, "rater", actor="bench")[1]
            conversation = store.new_conversation_id(name)
            ids = [store.new_response_id() for _ in range(answers)]
            futures = [
                store.submit_response(
                    Response(
                        rid,
                        conversation,
                        prompt,
                        f"answer {rid}",
                        "bench",
                        SamplingParams(),
                        4,
                        4,
                        1.0,
                        rater_id=name,
                    )
                )
                for rid in ids
            ]
            for f in futures:
                f.result()
            out.append((token, ids))
    return out


def feedback_bodies(ids: list[int], n: int) -> list[tuple[str, str, bytes]]:
    """`n` votes cycling through MIX on the answers `ids` (the client's own), each on an item of
    its own while `n` stays under the kinds' room (len(ids) thumbs, ...): one vote per rater
    and item, and a repeat would replace a row, not add one."""
    k = len(ids)
    seen: Counter[str] = Counter()
    bodies = []
    for i in range(n):
        kind = MIX[i % len(MIX)]
        j = seen[kind]
        seen[kind] += 1
        one, step = ids[j % k], 1 + j // k
        body: dict[str, object]
        if kind == "thumbs":
            body = {"kind": kind, "response_id": one, "value": 1 if j % 3 else -1}
        elif kind == "rating":
            body = {"kind": kind, "response_id": one, "value": 1 + j % 5, "reason": f"r{j}"}
        elif kind == "edit":
            body = {"kind": kind, "response_id": one, "text": f"A better answer, take {j}."}
        elif kind == "comparison":
            pair = [one, ids[(j + step) % k]]
            body = {"kind": kind, "response_ids": pair, "winner": ("a", "b", "tie")[j % 3]}
        else:
            body = {"kind": kind, "response_ids": [ids[(j + m * step) % k] for m in range(3)]}
        ids_named = body.get("response_ids") or [body["response_id"]]
        item = ",".join(map(str, sorted(ids_named)))  # what the store counts one vote on
        bodies.append((kind, item, json.dumps(body).encode()))
    return bodies


def encode_requests(
    port: int, bodies: list[tuple[str, str, bytes]], token: str
) -> list[tuple[str, str, bytes]]:
    """Whole HTTP/1.1 keep-alive requests, ready to write to a socket, signed in with `token`."""
    head = (
        f"POST /v1/feedback HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\n"
    )
    return [
        (kind, item, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for kind, item, body in bodies
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
    ports: list[int],
    requests: list[tuple[str, str, bytes]],
    number: int,
    window: tuple[float, float],
    tally: Tally,
) -> None:
    """One connection, one request at a time, until the window's end (perf_counter time). Its
    server is `ports[number % len(ports)]`; when that one goes away, the next one."""
    start, end = window
    at = number % len(ports)
    reader, writer = await asyncio.open_connection(HOST, ports[at])
    i = 0
    try:
        while (now := time.perf_counter()) < end:
            kind, item, req = requests[i % len(requests)]
            i += 1
            writer.write(req)
            try:
                status = await read_response(reader)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                tally.errors[type(exc).__name__] += 1
                writer.close()
                try:
                    reader, writer = await asyncio.open_connection(HOST, ports[at])
                except OSError:  # it is gone: the next one
                    tally.moved += 1
                    at = (at + 1) % len(ports)
                    reader, writer = await asyncio.open_connection(HOST, ports[at])
                continue
            done = time.perf_counter()
            if status != 201:
                tally.errors[str(status)] += 1
                continue
            tally.acked[kind] += 1
            tally.votes[kind].add((number, item))
            if now >= start and done <= end:
                tally.window_acked += 1
                tally.latencies.append(done - now)
    finally:
        writer.close()


async def load(
    ports: list[int],
    requests: list[list[tuple[str, str, bytes]]],
    warmup: float,
    seconds: float,
    kill: tuple[float, subprocess.Popen] | None = None,
) -> Tally:
    """Run one client per request list through the warm-up and the window; fails after
    STALL_S more seconds. `kill`: SIGKILL that process that many seconds in."""
    tally = Tally()
    t0 = time.perf_counter()
    window = (t0 + warmup, t0 + warmup + seconds)
    runs = [client(ports, r, c, window, tally) for c, r in enumerate(requests)]
    if kill is not None:
        runs.append(_kill_after(*kill))
    await asyncio.wait_for(asyncio.gather(*runs), warmup + seconds + STALL_S)
    return tally


async def _kill_after(delay: float, proc: subprocess.Popen) -> None:
    await asyncio.sleep(delay)
    proc.send_signal(signal.SIGKILL)


@contextmanager
def gateway(server: ServerProcess) -> Iterator[tuple[int, subprocess.Popen]]:
    """`tuneloop gateway` in front of `server`, in a process of its own on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "tuneloop.cli", "gateway", "--data-dir", str(server.data_dir)]
    argv += ["--primary", server.url, "--port", str(port)]
    log = server.data_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://{HOST}:{port}", proc, 120, log.read_text)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


def lost_votes(db: Path, votes: dict[str, set[tuple[int, str]]]) -> int:
    """Votes acknowledged to a client that the DuckDB file does not hold."""
    from tuneloop.feedback.store import FEEDBACK_TABLES

    lost = 0
    with duckdb.connect(str(db), read_only=True) as con:
        for kind, acked in votes.items():
            table = FEEDBACK_TABLES[kind]
            stored = set(con.execute(f"SELECT rater_id, item FROM {table}").fetchall())
            lost += sum((f"bench-{k}", item) not in stored for k, item in acked)
    return lost


@dataclass
class Usage:
    """CPU seconds used by the server and by this process over `elapsed` seconds of load."""

    elapsed: float
    server_cpu: float
    client_cpu: float


def run(args: argparse.Namespace, model: Path, data_dir: Path, limit: int) -> tuple[int, float]:
    """One run with the per-rater feedback limit at `limit` (0: none): its exit code (0: every
    write acknowledged and stored, and the goals of a kill met) and its writes/s."""
    clients = prepare(data_dir / "server", args.clients, args.answers)
    limited = ["--feedback-per-minute", str(limit)]
    with ServerProcess(model, data_dir / "server", args=limited) as server, ExitStack() as gws:
        gateways = [gws.enter_context(gateway(server)) for _ in range(args.gateways)]
        ports = [port for port, _ in gateways] or [server.port]
        requests = [
            encode_requests(ports[c % len(ports)], feedback_bodies(ids, args.votes), token)
            for c, (token, ids) in enumerate(clients)
        ]
        kill = (args.warmup + args.kill_after, gateways[0][1]) if args.kill_after else None
        before = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
        pids = [server.pid, *(proc.pid for _, proc in gateways)]
        cpu0 = sum(map(cpu_seconds, pids)), cpu_seconds(os.getpid())
        started = time.perf_counter()
        tally = asyncio.run(load(ports, requests, args.warmup, args.seconds, kill))
        alive = [server.pid, *(p.pid for _, p in gateways if p.poll() is None)]
        usage = Usage(
            time.perf_counter() - started,
            sum(map(cpu_seconds, alive)) - cpu0[0],
            cpu_seconds(os.getpid()) - cpu0[1],
        )
        after = httpx.get(f"{server.url}/v1/feedback/stats", headers=server.auth).json()
    where = f"over {args.gateways} gateways" if args.gateways else "straight to the server"
    print(
        f"clients: {args.clients} {where}  window: {args.seconds:g} s after {args.warmup:g} s "
        f"warm-up  answers per client: {args.answers}  feedback limit per rater: "
        f"{limit or 'none'}  cpus: {os.cpu_count()}"
    )
    stored = {k: after[k] - before[k] for k in KINDS}
    rate = tally.window_acked / args.seconds
    if kill is None:
        return report(args, tally, usage, stored), rate
    # A write sent through the killed gateway may be stored without its client hearing so:
    # what counts is that every acknowledged vote is in the file.
    lost = lost_votes(data_dir / "server" / "feedback.duckdb", tally.votes)
    print(
        f"gateway 0 SIGKILLed {args.kill_after:g} s into the window; {tally.moved} clients "
        f"went on through another; acknowledged votes not in the file: {lost}"
    )
    report(args, tally, usage, stored)
    met = rate >= GOAL_WRITES_PER_S and lost == 0
    print(
        f"goal with a gateway killed: >= {GOAL_WRITES_PER_S:,.0f} acknowledged writes/s and 0 "
        f"lost: {'met' if met else 'MISSED'} ({rate:,.0f} writes/s, {lost} lost; the errors "
        "are the requests the killed gateway never answered)"
    )
    return (0 if met else 1), rate


def report(args: argparse.Namespace, tally: Tally, usage: Usage, stored: dict[str, int]) -> int:
    """Print the results; 0 when every write was acknowledged and stored, else 1."""
    lat = sorted(tally.latencies)
    rate = tally.window_acked / args.seconds
    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
    worst = lat[-1] * 1e3 if lat else float("nan")
    n_errors = sum(tally.errors.values())
    acked = sum(tally.acked.values())
    votes = {k: len(tally.votes[k]) for k in KINDS}
    count_ok = stored == votes
    per_write = 1e6 / max(acked, 1)
    print(
        f"CPU over the load ({usage.elapsed:.1f} s, {acked:,} writes): "
        f"server and gateways {usage.server_cpu / usage.elapsed:.2f} cores = "
        f"{usage.server_cpu * per_write:,.0f} us/write, "
        f"client {usage.client_cpu / usage.elapsed:.2f} cores = "
        f"{usage.client_cpu * per_write:,.0f} us/write"
    )
    print()
    print(f"acknowledged writes/s (window): {rate:,.0f}   ({tally.window_acked:,} in window)")
    print(f"latency ms: p50 {p50:.1f}  p99 {p99:.1f}  max {worst:.1f}")
    print(f"errors: {n_errors}" + (f"  {dict(tally.errors)}" if n_errors else ""))
    print()
    print(f"{'kind':<12}{'acked':>10}{'votes':>10}{'stored':>10}")
    for k in KINDS:
        print(f"{k:<12}{tally.acked[k]:>10,}{votes[k]:>10,}{stored[k]:>10,}")
    print(f"{'total':<12}{acked:>10,}{sum(votes.values()):>10,}{sum(stored.values()):>10,}")
    print(f"stats match the distinct votes acknowledged: {'yes' if count_ok else 'NO'}")
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
        "--answers", type=int, default=400, help="stored answers per client to vote on (>= 3)"
    )
    parser.add_argument(
        "--votes",
        type=int,
        default=1000,
        help="distinct votes per client before its requests repeat (a repeat replaces a vote)",
    )
    parser.add_argument("--model", type=Path, help="model dir (default: a tiny random model)")
    parser.add_argument(
        "--gateways", type=int, default=0, help="tuneloop gateways in front of the server"
    )
    parser.add_argument(
        "--kill-after", type=float, default=0.0, help="SIGKILL gateway 0 this far into the window"
    )
    parser.add_argument(
        "--feedback-per-minute",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="the per-rater feedback limit (0: none); several values: one run each, compared",
    )
    args = parser.parse_args(argv)
    if args.answers < 3:
        parser.error("--answers must be at least 3")
    codes, rates = [], []
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model
        if model is None:
            from tuneloop.train.tiny_model import build_tiny_model

            model = build_tiny_model(Path(tmp) / "model")
        for i, limit in enumerate(args.feedback_per_minute):
            code, rate = run(args, model, Path(tmp) / f"run-{i}", limit)
            codes.append(code)
            rates.append(rate)
            print()
    for limit, rate in zip(args.feedback_per_minute, rates, strict=True):
        print(
            f"feedback limit {limit or 'none'}: {rate:,.0f} writes/s = "
            f"{rate / rates[0]:.2f}x the first run"
        )
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
