"""Benchmark: streaming chat through `POST /v1/chat/completions` vs the embedded engine called
directly, in one run.

Both paths serve the same model (default: a tiny random Llama built with `build_tiny_model`,
hidden size 256 and 4 layers, a few ms per token on CPU) with greedy decoding and a fixed
`max_tokens`, on the same fixed prompts (the first turns of MT-bench, from
`../shared/data/mt-bench/questions.jsonl` beside the repo when present, else a built-in list):

- direct: `EmbeddedEngine(model, "bench").stream(...)` in this process, iterated to the end;
  tokens = `Generation.completion_tokens`.
- api: `tuneloop up --no-ui` in a separate process, streamed with httpx (SSE); tokens = the
  `completion_tokens` of the final usage chunk (`stream_options.include_usage`).

A round sends every prompt through one path, `concurrency` requests at a time; throughput of a
round = its completion tokens / its wall time (first request sent to last stream ended). The paths
alternate round by round (direct, api, api, direct, ...), so that each pair of rounds runs back to
back and the machine's noise hits both. Printed per concurrency: tokens/s and api/direct of each
pair; per path, tokens/s over all its rounds (total tokens / total time), time to the first text
chunk (p50) and CPU ms per token of this process and of the server (read from /proc around each
round: the server's CPU during direct rounds shows that it was idle, this process's CPU during api
rounds is the client's share). The ratio judged against the goal is the median of the pairs' ratios,
which a burst of load from elsewhere on the machine moves less than the totals (printed too).
Greedy decoding makes both paths produce the same text and token counts, which is checked.

`--torch-threads N` sets the intra-op threads of both processes (default: torch's choice, as
`tuneloop up` runs).

Goal: api tokens/s >= 0.9 x direct tokens/s.

    python bench/chat_streaming.py [--model DIR] [--max-tokens 64] [--prompts 4] [--rounds 8]
        [--concurrency 1 4] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import ServerProcess, cpu_seconds

from tuneloop.records import Message, SamplingParams
from tuneloop.serve.engine import EmbeddedEngine

GOAL_RATIO = 0.9
MT_BENCH = Path(__file__).resolve().parents[1].parent / "shared/data/mt-bench/questions.jsonl"
BUILTIN_PROMPTS = (
    "Explain how a hash table handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the trade-offs between threads and processes?",
    "Summarise the plot of a detective story in three sentences.",
    "How does a compiler turn source code into machine code?",
    "Give three tips for writing clear documentation.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "Compare breadth-first and depth-first search.",
)


@dataclass(frozen=True)
class Answer:
    """One streamed answer: its text, completion tokens, and seconds to the first text chunk."""

    text: str
    tokens: int
    first_chunk_s: float


@dataclass(frozen=True)
class Round:
    """One path's answers to all prompts, with the wall time and the CPU seconds used meanwhile
    by this process (`bench_cpu_s`) and by the server process (`server_cpu_s`)."""

    path: str
    wall_s: float
    bench_cpu_s: float
    server_cpu_s: float
    answers: list[Answer]

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)


def load_prompts(n: int) -> list[str]:
    """The first turns of the first `n` MT-bench questions, else the built-in prompts."""
    if MT_BENCH.exists():
        with MT_BENCH.open() as f:
            turns = [json.loads(line)["turns"][0] for line in f if line.strip()]
    else:
        turns = list(BUILTIN_PROMPTS)
    return [turns[i % len(turns)] for i in range(n)]


def direct_answer(engine: EmbeddedEngine, prompt: str, params: SamplingParams) -> Answer:
    """Generate in this process, reading the chunks as a streaming caller would."""
    started = time.perf_counter()
    generation = engine.stream([Message("user", prompt)], params)
    parts: list[str] = []
    first = 0.0
    for chunk in generation:
        if not parts:
            first = time.perf_counter() - started
        parts.append(chunk)
    return Answer("".join(parts), generation.completion_tokens, first)


def api_answer(client: httpx.Client, prompt: str, params: SamplingParams) -> Answer:
    """Stream one chat completion over SSE; tokens from the final usage chunk."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    parts: list[str] = []
    first = 0.0
    tokens = -1
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text = choice["delta"].get("content")
                if text:
                    if not parts:
                        first = time.perf_counter() - started
                    parts.append(text)
    if tokens < 0:
        raise RuntimeError("the stream ended without a usage chunk")
    return Answer("".join(parts), tokens, first)


def run_round(
    path: str,
    answer: Callable[[str], Answer],
    prompts: list[str],
    concurrency: int,
    server_pid: int,
) -> Round:
    """All prompts through one path, `concurrency` at a time; answers in prompt order."""
    cpu = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(answer, prompts))
    wall = time.perf_counter() - started
    return Round(
        path,
        wall,
        cpu_seconds(os.getpid()) - cpu[0],
        cpu_seconds(server_pid) - cpu[1],
        answers,
    )


def report(rounds: list[Round], concurrency: int) -> tuple[float, bool]:
    """Print one concurrency level's rounds and totals; return the median paired ratio and
    whether both paths gave the same answers."""
    by_path = {p: [r for r in rounds if r.path == p] for p in ("direct", "api")}
    rate = {p: sum(r.tokens for r in rs) / sum(r.wall_s for r in rs) for p, rs in by_path.items()}
    print(f"concurrency {concurrency}")
    print(f"  {'pair':<6}{'direct tok/s':>14}{'api tok/s':>12}{'api/direct':>12}")
    paired = []
    for i, (d, a) in enumerate(zip(by_path["direct"], by_path["api"], strict=True)):
        d_rate, a_rate = d.tokens / d.wall_s, a.tokens / a.wall_s
        paired.append(a_rate / d_rate)
        print(f"  {i + 1:<6}{d_rate:>14.1f}{a_rate:>12.1f}{paired[-1]:>12.3f}")
    for p, rs in by_path.items():
        ttft = statistics.median(a.first_chunk_s for r in rs for a in r.answers) * 1e3
        tokens = sum(r.tokens for r in rs)
        bench_ms = sum(r.bench_cpu_s for r in rs) / tokens * 1e3
        server_ms = sum(r.server_cpu_s for r in rs) / tokens * 1e3
        print(
            f"  {p:<7}{rate[p]:8.1f} tokens/s ({tokens} tokens)  first chunk p50 {ttft:5.1f} ms  "
            f"CPU ms/token: bench {bench_ms:.2f}, server {server_ms:.2f}"
        )
    same = all(
        a.text == b.text and a.tokens == b.tokens
        for d in by_path["direct"]
        for api in by_path["api"]
        for a, b in zip(d.answers, api.answers, strict=True)
    )
    print(f"  same text and tokens on both paths: {'yes' if same else 'NO'}")
    ratio = statistics.median(paired)
    print(
        f"  api/direct: {ratio:.3f} (median of pairs), {rate['api'] / rate['direct']:.3f} (totals)"
        f"   goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'MISSED'}"
    )
    return ratio, same


def run(args: argparse.Namespace, model: Path, tmp: Path) -> int:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    prompts = load_prompts(args.prompts)
    params = SamplingParams(args.max_tokens, 0.0, 1.0)
    engine = EmbeddedEngine(model, "bench")
    server_env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    with (
        ServerProcess(model, tmp / "server", env=server_env) as server,
        httpx.Client(
            base_url=server.url,
            timeout=300.0,
            limits=httpx.Limits(max_connections=max(args.concurrency)),
        ) as client,
    ):
        paths: dict[str, Callable[[str], Answer]] = {
            "direct": lambda p: direct_answer(engine, p, params),
            "api": lambda p: api_answer(client, p, params),
        }
        for answer in paths.values():  # warm-up, not measured
            answer(prompts[0])
        print(
            f"model: {model}  max_tokens: {args.max_tokens}  prompts: {len(prompts)} "
            f"({'MT-bench' if MT_BENCH.exists() else 'built-in'})  rounds per path: "
            f"{args.rounds}  cpus: {os.cpu_count()}  torch threads: {torch.get_num_threads()}"
        )
        results = []
        for concurrency in args.concurrency:
            rounds = [
                run_round(path, paths[path], prompts, concurrency, server.pid)
                for i in range(args.rounds)
                for path in (("direct", "api") if i % 2 == 0 else ("api", "direct"))
            ]
            results.append(report(rounds, concurrency))
    met = all(ratio >= GOAL_RATIO for ratio, _ in results)
    summary = ", ".join(
        f"c={c}: {ratio:.3f}" for c, (ratio, _) in zip(args.concurrency, results, strict=True)
    )
    print(f"goal: api tokens/s >= {GOAL_RATIO} x direct: {'met' if met else 'MISSED'} ({summary})")
    return 0 if all(same for _, same in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model dir (default: a tiny random model)")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the default model")
    parser.add_argument("--num-layers", type=int, default=4, help="of the default model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="requests per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads in both processes (torch.set_num_threads here, OMP_NUM_THREADS "
        "for the server; default: torch's choice)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model
        if model is None:
            from tuneloop.train.tiny_model import build_tiny_model

            model = build_tiny_model(
                Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=args.num_layers
            )
        return run(args, model, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
