"""Benchmark: an operator's routes while non-streamed chats fill the server.

Starts `tuneloop up --no-ui` with a tiny random model (two versions registered, so that there is
something to roll back to and promote again), starts `--chats` non-streamed chat requests at once
(`--max-tokens` each, more than the engine runs at a time, so most of them wait), and while they
run times `GET /v1/admin/versions`, `POST /v1/admin/rollback` and `POST /v1/admin/promote`
(each a hot-swap), one after the other, `--rounds` times. A non-streamed answer used to be read
in one of the server's worker threads (40 of them): 40 waiting chats held them all, and every
admin route that needs one waited for an answer to end.

Goal (issue: who may teach the model): a rollback answers in < 1 s while 50 chats run.

    python bench/admin_under_load.py [--chats 50] [--max-tokens 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import ServerProcess, percentile

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

GOAL_S = 1.0


def register(data: Path, old: Path, new: Path) -> None:
    """policy-v1 (old) promoted, then policy-v2 (new): a rollback serves policy-v1 again."""
    with FeedbackStore(DataDir(data).db) as store:
        for vid, path in (("policy-v1", old), ("policy-v2", new)):
            registry.register_version(store, ModelVersion(vid, "policy", str(old), str(path)))
            registry.promote(store, vid, reason="set up by the benchmark")


def chats(url: str, auth: dict[str, str], n: int, max_tokens: int, done: list[float]) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
    }

    def one() -> None:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=600)
        r.raise_for_status()
        done.append(time.monotonic())

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()


def timed(client: httpx.Client, method: str, route: str, body: dict | None = None) -> float:
    started = time.perf_counter()
    client.request(method, route, json=body).raise_for_status()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from tuneloop.train.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        old = build_tiny_model(Path(tmp) / "old", seed=0)
        new = build_tiny_model(Path(tmp) / "new", seed=1)
        data = Path(tmp) / "data"
        register(data, old, new)
        with ServerProcess(new, data, args=["--chats-per-minute", "0"]) as server:
            admin = httpx.Client(base_url=server.url, headers=server.auth, timeout=120)
            done: list[float] = []
            chats(server.url, server.auth, args.chats, args.max_tokens, done)
            time.sleep(1.0)  # the chats are in
            times: dict[str, list[float]] = {"versions": [], "rollback": [], "promote": []}
            for _ in range(args.rounds):
                times["versions"].append(timed(admin, "GET", "/v1/admin/versions"))
                times["rollback"].append(timed(admin, "POST", "/v1/admin/rollback"))
                promote = {"version": "policy-v2", "force": True}  # rolled back: rejected
                times["promote"].append(timed(admin, "POST", "/v1/admin/promote", promote))
            running = args.chats - len(done)
    print(f"{args.chats} non-streamed chats of {args.max_tokens} tokens; {running} still running")
    print(f"{'route':<10}{'p50 s':>8}{'max s':>8}")
    for route, values in times.items():
        values.sort()
        print(f"{route:<10}{percentile(values, 50):>8.3f}{values[-1]:>8.3f}")
    worst = max(times["rollback"])
    met = worst < GOAL_S and running > 0
    print(
        f"goal: a rollback in < {GOAL_S:.0f} s while the chats run: "
        f"{'met' if met else 'MISSED'} (slowest {worst:.3f} s, {running} chats running at the end)"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
