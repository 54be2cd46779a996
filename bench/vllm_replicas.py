"""Benchmark: tuneloop in front of vLLM replicas (`tuneloop up --engine vllm --vllm-replicas N`).

1. Throughput: `--streams` clients (default 16) stream greedy answers back to back for
   `--seconds`, from one replica and then from two, each replica on a CPU of its own
   (`--vllm-cpus`), side by side in one run: answers/s and completion tokens/s (counted from the
   stored responses), and each replica's share. On a 2-core machine this shows that routing
   spreads the load, not a speed-up: tuneloop and the clients share those cores with vLLM.
2. A replica killed as a promotion starts: with 8 clients streaming, replica 1's vLLM gets
   SIGKILL and a LoRA candidate is promoted at once. Goals: the promotion is refused as aborted,
   nothing is switched, 0 failed requests, 0 answers naming two versions, and the answers that
   replica 1 was giving finish from replica 0 (its `taken_over` count). Then the time until
   tuneloop has restarted it and routes to it again.

The hot-swap under 8 streams across 2 replicas is `bench/hot_swap.py --engine vllm
--candidate-kind lora --vllm-replicas 2 --vllm-cpus 0 1`.

    python bench/vllm_replicas.py [--streams 16] [--seconds 20] [--max-tokens 32]
        [--vllm-cpus 0 1] [--vllm-python PY]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import httpx
from common import ServerProcess
from hot_swap import Stream, client_loop

from tuneloop.cli_engine import default_vllm_env
from tuneloop.core.config import DataDir
from tuneloop.core.cpu_affinity import keep_off, parse_cpu_list
from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore


def serve(args: argparse.Namespace, model: Path, data: Path, replicas: int) -> ServerProcess:
    engine = ["--engine", "vllm", "--vllm-python", args.vllm_python]
    engine += ["--vllm-replicas", str(replicas), "--vllm-cpus", *args.vllm_cpus[:replicas]]
    engine += ["--vllm-dtype", "float32"]  # as bench/hot_swap.py: greedy answers comparable
    return ServerProcess(model, data, max_concurrency=args.streams, args=engine, start_timeout=600)


def stream_for(
    server: ServerProcess, clients: int, max_tokens: int, seconds: float
) -> list[Stream]:
    streams: list[Stream] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=client_loop, args=(server.url, server.auth, max_tokens, streams, stop, k)
        )
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return streams


def engine_state(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/v1/admin/engine", headers=server.auth, timeout=30).json()


def throughput(args: argparse.Namespace, model: Path, tmp: Path, replicas: int) -> dict:
    data = tmp / f"throughput-{replicas}"
    with serve(args, model, data, replicas) as server:
        stream_for(server, args.streams, args.max_tokens, 3.0)  # warm-up, not counted
        before = time.time()
        streams = stream_for(server, args.streams, args.max_tokens, args.seconds)
        rows = engine_state(server)["replicas"]
        # One replica is the plain vLLM engine, which does not count answers by replica.
        shares = [sum(r["answered"].values()) for r in rows] if replicas > 1 else "-"
    with duckdb.connect(str(DataDir(data).db), read_only=True) as con:
        tokens = con.execute(
            "SELECT sum(completion_tokens) FROM responses WHERE created_at >= to_timestamp(?)",
            [before],
        ).fetchone()[0]
    return {
        "replicas": replicas,
        "answers_s": sum(not s.error for s in streams) / args.seconds,
        "tokens_s": (tokens or 0) / args.seconds,
        "failed": sum(bool(s.error) for s in streams),
        "shares": shares,
    }


def killed_mid_promotion(args: argparse.Namespace, model: Path, candidate: Path, tmp: Path) -> bool:
    data = tmp / "kill"
    with FeedbackStore(DataDir(data).db) as store:
        version = ModelVersion(
            "policy-candidate", "policy", str(model), str(candidate), adapter=True
        )
        registry.register_version(store, version)
    with serve(args, model, data, 2) as server:
        served = engine_state(server)["version"]
        pid = int((data / "vllm" / "replica-1" / "vllm.pid").read_text())
        streams: list[Stream] = []
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=client_loop,
                args=(server.url, server.auth, args.max_tokens, streams, stop, k),
            )
            for k in range(8)
        ]
        for t in threads:
            t.start()
        time.sleep(3.0)
        os.killpg(pid, signal.SIGKILL)
        with httpx.Client(base_url=server.url, headers=server.auth, timeout=120) as admin:
            r = admin.post("/v1/admin/promote", json={"version": "policy-candidate"})
        killed = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join()
        state = engine_state(server)
        while not all(row["up"] for row in state["replicas"]):
            time.sleep(0.5)
            state = engine_state(server)
        back = time.monotonic() - killed
    failed = [s for s in streams if s.error]
    mixed = [s for s in streams if not s.error and s.models != {served}]
    message = r.json().get("error", {}).get("message", "") if r.status_code != 200 else ""
    print(f"\nreplica 1 killed as {served} -> policy-candidate was promoted; 8 clients streaming")
    print(f"promotion: {r.status_code}: {message[:160]}")
    print(
        f"requests: {len(streams)}, failed: {len(failed)} (goal 0), naming another version "
        f"than {served}: {len(mixed)} (goal 0)"
    )
    print(
        f"answers replica 1 lost mid-way, finished by replica 0: "
        f"{state['replicas'][1]['taken_over']}"
    )
    print(
        f"replica 1 restarted and routed to again {back:.0f} s after the kill; "
        f"served: {state['version']}"
    )
    for s in failed[:3]:
        print(f"  failed: {s.error}")
    return r.status_code != 200 and "aborted" in message and not failed and not mixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vllm-cpus", nargs=2, default=["0", "1"], metavar="LIST")
    parser.add_argument("--vllm-python", default=str(default_vllm_env() / "bin" / "python"))
    args = parser.parse_args(argv)
    keep_off(frozenset().union(*map(parse_cpu_list, args.vllm_cpus)))
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        from tuneloop.train.tiny_model import build_random_lora, build_tiny_model

        shape = {"hidden_size": 96, "num_layers": 4, "vocab_size": 4096}
        model = build_tiny_model(Path(tmp) / "model", seed=0, **shape)
        candidate = build_random_lora(model, Path(tmp) / "candidate")
        rows = [throughput(args, model, Path(tmp), n) for n in (1, 2)]
        print(
            f"{args.streams} clients streaming greedy answers of up to {args.max_tokens} tokens "
            f"for {args.seconds:g} s; vLLM on CPUs {' and '.join(args.vllm_cpus)}"
        )
        print("| replicas | answers/s | tokens/s | failed | answers per replica |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['replicas']} | {row['answers_s']:.1f} | {row['tokens_s']:.0f} | "
                f"{row['failed']} | {row['shares']} |"
            )
        print(
            f"2 replicas / 1: {rows[1]['tokens_s'] / max(rows[0]['tokens_s'], 1e-9):.2f}x tokens/s"
        )
        ok = killed_mid_promotion(args, model, candidate, Path(tmp))
    ok = ok and not any(row["failed"] for row in rows)
    print(f"goal: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
