"""Benchmark: hot-swap under load. Streams run back to back from `--streams` clients while the
operator promotes a new version (`POST /v1/admin/promote`) and then rolls back
(`POST /v1/admin/rollback`).

Reported, for the promotion and for the rollback:

- failed requests (any error or non-200): goal 0;
- responses mixing versions: goal 0. Decoding is greedy, so every answer must equal, character for
  character, what the version named in its chunks answers alone (asked one at a time through the
  same server before the load starts: promote, ask, promote back); a stream whose chunks name two
  versions, or whose stored `model_version_id` differs from its chunks, counts too;
- seconds from sending the promote (rollback) request to the first text chunk of the new version
  (of the first request that starts after it): goal under 1 s on a demo-sized model (on vLLM:
  for a LoRA candidate).

The served version is a model of the demo model's shape (hidden 96, 4 layers, vocab 4096) with
random weights; the candidate (`--candidate-kind`) is another such model (`full`: on vLLM a
merged-weights swap, drain and reload) or a LoRA adapter over the served model with random
weights (`lora`: on vLLM a new adapter name). `--model` and `--candidate` name checkpoints or
version dirs instead. `--engine vllm` serves from vLLM (`--vllm-python`, default `tuneloop
vllm-env`'s interpreter).

`--vllm-replicas 2` serves from two vLLM replicas behind tuneloop (give `--vllm-cpus` one list
per replica); it also reports how many answers each replica gave from each version, and checks
that both gave answers from the promoted version and from the rolled-back one.

`--training-beside` runs a training job's load in another process during the load phases
(`training_load.py`: the server and it compete for the cores, as when a job runs on the serving
machine) and prints its steps/s; `--training-env NAME=VALUE` sets a variable for that process only
(an OpenMP setting other than the server's, say).

    python bench/hot_swap.py [--engine embedded|vllm] [--candidate-kind full|lora] [--streams 8]
        [--phase-seconds 4] [--max-tokens 32] [--vllm-replicas N] [--vllm-cpus LIST ...]
        [--training-beside [--training-env NAME=VALUE]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx
from common import ServerProcess

from tuneloop.cli_engine import default_vllm_env
from tuneloop.core.artifacts import is_adapter
from tuneloop.core.config import DataDir
from tuneloop.core.cpu_affinity import keep_off, parse_cpu_list
from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

PROMPTS = [
    f"Question {i}: what does the {w} module do?"
    for i, w in enumerate(
        [
            "os",
            "sys",
            "json",
            "re",
            "math",
            "time",
            "random",
            "string",
            "heapq",
            "bisect",
            "array",
            "queue",
        ]
    )
]
GOAL_SWAP_S = 1.0


@dataclass
class Stream:
    prompt: int
    started: float
    first_chunk: float = 0.0
    models: set[str] = field(default_factory=set)
    text: str = ""
    response_id: int = 0
    error: str = ""


def answers_alone(url: str, auth: dict[str, str], max_tokens: int) -> list[str]:
    """The served version's greedy answer to each prompt, one request at a time."""
    answers = []
    with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
        for prompt in PROMPTS:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            r = http.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


def client_loop(
    url: str,
    auth: dict[str, str],
    max_tokens: int,
    out: list[Stream],
    stop: threading.Event,
    k: int,
) -> None:
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        i = k
        while not stop.is_set():
            s = Stream(i % len(PROMPTS), time.perf_counter())
            body = {
                "messages": [{"role": "user", "content": PROMPTS[s.prompt]}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
            }
            try:
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        s.models.add(event["model"])
                        s.response_id = int(event["id"])
                        for choice in event["choices"]:
                            text = choice["delta"].get("content")
                            if text:
                                s.first_chunk = s.first_chunk or time.perf_counter()
                                s.text += text
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                s.error = str(exc) or type(exc).__name__
            out.append(s)
            i += 1


def promote(admin: httpx.Client, version: str) -> None:
    admin.post("/v1/admin/promote", json={"version": version}).raise_for_status()


def run_phases(
    args: argparse.Namespace, admin: httpx.Client, candidate: str, marks: dict[str, float]
) -> None:
    """Serve, promote the candidate, serve, roll back, serve: `--phase-seconds` each."""
    time.sleep(args.phase_seconds)
    marks["promote"] = time.perf_counter()
    promote(admin, candidate)
    marks["promote_done"] = time.perf_counter()
    time.sleep(args.phase_seconds)
    marks["rollback"] = time.perf_counter()
    admin.post("/v1/admin/rollback").raise_for_status()
    marks["rollback_done"] = time.perf_counter()
    time.sleep(args.phase_seconds)


@contextmanager
def training_beside(env: list[str]) -> Iterator[None]:
    """Run `training_load.py` while the block runs; print its steps/s after."""
    extra = dict(item.split("=", 1) for item in env)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("training_load.py"))],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | extra,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "training":
            raise RuntimeError("the training load did not start")
        yield
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        print(f"beside: {out.strip()} {' '.join(env)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--candidate", type=Path)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--phase-seconds", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=("embedded", "vllm"), default="embedded")
    parser.add_argument("--candidate-kind", choices=("full", "lora"), default="full")
    parser.add_argument("--vllm-python", default=str(default_vllm_env() / "bin" / "python"))
    parser.add_argument("--vllm-replicas", type=int, default=1)
    parser.add_argument(
        "--vllm-cpus",
        nargs="+",
        default=[],
        metavar="LIST",
        help="tuneloop's --vllm-cpus: vLLM's processes on these CPUs (one list per replica), "
        "tuneloop's and this benchmark's on the others",
    )
    parser.add_argument("--training-beside", action="store_true")
    parser.add_argument("--training-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        old, new = args.model, args.candidate
        if old is None or new is None:
            from tuneloop.train.tiny_model import build_random_lora, build_tiny_model

            shape = {"hidden_size": 96, "num_layers": 4, "vocab_size": 4096}
            old = build_tiny_model(Path(tmp) / "old", seed=0, **shape)
            if args.candidate_kind == "lora":
                new = build_random_lora(old, Path(tmp) / "new")
            else:
                new = build_tiny_model(Path(tmp) / "new", seed=1, **shape)
        return run(args, Path(old), Path(new), Path(tmp) / "data")


def run(args: argparse.Namespace, old: Path, new: Path, data: Path) -> int:
    dd = DataDir(data)
    with FeedbackStore(dd.db) as store:  # the candidate, registered before the server starts
        candidate = registry.register_version(
            store,
            ModelVersion(
                "policy-candidate",
                "policy",
                str(old),
                str(new.resolve()),
                adapter=is_adapter(new),
            ),
        ).id
    engine_args = ["--engine", args.engine]
    if args.engine == "vllm":
        engine_args += ["--vllm-python", args.vllm_python]
        # float32: vLLM's "auto" runs a float32 checkpoint in bfloat16 on CPU, where greedy
        # answers under concurrent batching differ from the same answer asked alone (66 of 444
        # here, with no swap at all), which the exact-text check below would count as mixed.
        engine_args += ["--vllm-replicas", str(args.vllm_replicas), "--vllm-dtype", "float32"]
        if args.vllm_cpus:
            engine_args += ["--vllm-cpus", *args.vllm_cpus]
            # The clients, as tuneloop itself (nothing moves if no CPU would be left).
            keep_off(frozenset().union(*map(parse_cpu_list, args.vllm_cpus)))
    streams: list[Stream] = []
    stop = threading.Event()
    marks: dict[str, float] = {}
    with ServerProcess(
        old, data, max_concurrency=args.streams, args=engine_args, start_timeout=600
    ) as server:
        served = httpx.get(f"{server.url}/health").json()["model_version"]
        # One client, made before the load: a client made per request under the streams'
        # threads reached the server up to 1.4 s after it was "sent", counted as swap time.
        admin = httpx.Client(base_url=server.url, headers=server.auth, timeout=120)

        refs = {served: answers_alone(server.url, server.auth, args.max_tokens)}
        promote(admin, candidate)
        refs[candidate] = answers_alone(server.url, server.auth, args.max_tokens)
        promote(admin, served)
        threads = [
            threading.Thread(
                target=client_loop,
                args=(server.url, server.auth, args.max_tokens, streams, stop, k),
            )
            for k in range(args.streams)
        ]
        load = training_beside(args.training_env) if args.training_beside else nullcontext()
        with load:
            for t in threads:
                t.start()
            run_phases(args, admin, candidate, marks)
            stop.set()
            for t in threads:
                t.join()
        replicas = admin.get("/v1/admin/engine").json()["replicas"]
        admin.close()
        log = server.log_path.read_text(errors="replace")
        swaps = [line for line in log.splitlines() if "] serving " in line]
    stored = dict(
        duckdb.connect(str(dd.db), read_only=True)
        .execute("SELECT id, model_version_id FROM responses")
        .fetchall()
    )
    expected = refs
    failed = [s for s in streams if s.error]
    mixed = [
        s
        for s in streams
        if not s.error
        and (
            len(s.models) != 1
            or s.text != expected[next(iter(s.models))][s.prompt]
            or stored.get(s.response_id) != next(iter(s.models))
        )
    ]

    def first_token_after(mark: str, version: str) -> float:
        times = [
            s.first_chunk - marks[mark]
            for s in streams
            if not s.error and s.models == {version} and s.started >= marks[mark]
        ]
        return min(times) if times else float("nan")

    to_new = first_token_after("promote", candidate)
    to_old = first_token_after("rollback", served)
    print(
        f"engine: {args.engine}, candidate: {args.candidate_kind}; streams: {args.streams} "
        f"clients, {len(streams)} requests, greedy, {args.max_tokens} tokens"
    )
    print(f"versions: {served} (served) -> {candidate} (promoted) -> {served} (rollback)")
    print(f"failed requests: {len(failed)}   (goal 0)")
    print(f"responses mixing versions: {len(mixed)}   (goal 0)")
    print(
        f"promote request took {marks['promote_done'] - marks['promote']:.2f} s; "
        f"rollback {marks['rollback_done'] - marks['rollback']:.2f} s"
    )
    ttft = sorted(s.first_chunk - s.started for s in streams if not s.error and s.first_chunk)
    print(
        f"time to first token of any request under this load: p50 {ttft[len(ttft) // 2]:.2f} s"
        " (part of both figures below: a request started after the swap waits that long too)"
    )
    print(f"promote -> first token of {candidate}: {to_new:.2f} s   (goal < {GOAL_SWAP_S} s)")
    print(f"rollback -> first token of {served}: {to_old:.2f} s   (goal < {GOAL_SWAP_S} s)")
    print("the server's own account of the promote and the rollback:")
    for line in swaps[-2:]:
        print(f"  {line}")
    for s in failed[:3]:
        print(f"  failed: {s.error}")
    for s in mixed[:3]:
        model = next(iter(s.models))
        print(
            f"  mixed: chunks name {sorted(s.models)}, stored as {stored.get(s.response_id)}, "
            f"started {s.started - marks['promote']:+.2f} s from the promote; text "
            f"{s.text!r} vs {expected[model][s.prompt]!r} alone"
        )
    both = True
    if len(replicas) > 1:
        for row in replicas:
            print(
                f"  replica {row['replica']}: answers by version {row['answered']}, "
                f"lost mid-way and taken over: {row['taken_over']}"
            )
        # Every replica answered from the promoted version, and from the one rolled back to
        # after it (the served version's count includes the phase before the promotion).
        both = all(row["answered"].get(candidate, 0) > 0 for row in replicas)
        print(f"every replica answered from {candidate}: {both}")
    ok = not failed and not mixed and to_new < GOAL_SWAP_S and to_old < GOAL_SWAP_S and both
    print(f"goal: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
