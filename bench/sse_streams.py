"""Streaming clients shared by the streaming benchmarks: prompts, one SSE answer read as an
OpenAI client would, and rounds of answers at a given concurrency with the CPU they cost."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import cpu_seconds

from tuneloop.core.records import SamplingParams

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


def stream_answer(
    client: httpx.Client, prompt: str, params: SamplingParams, model: str | None = None
) -> Answer:
    """Stream one chat completion over SSE; tokens from the final usage chunk."""
    body = {
        **({"model": model} if model else {}),
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
    server_pids: Sequence[int],
) -> Round:
    """All prompts through one path, `concurrency` at a time; answers in prompt order. Server
    CPU is summed over `server_pids`."""

    def server_cpu() -> float:
        return sum(cpu_seconds(pid) for pid in server_pids)

    cpu = cpu_seconds(os.getpid()), server_cpu()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(answer, prompts))
    wall = time.perf_counter() - started
    return Round(
        path,
        wall,
        cpu_seconds(os.getpid()) - cpu[0],
        server_cpu() - cpu[1],
        answers,
    )


def report(
    rounds: list[Round], concurrency: int, goal: float, base: str = "direct", other: str = "api"
) -> tuple[float, bool]:
    """Print one concurrency level's rounds of two paths and their totals; return the median of
    the paired ratios (`other`/`base`) and whether both paths gave the same answers."""
    by_path = {p: [r for r in rounds if r.path == p] for p in (base, other)}
    rate = {p: sum(r.tokens for r in rs) / sum(r.wall_s for r in rs) for p, rs in by_path.items()}
    print(f"concurrency {concurrency}")
    ratio_name = f"{other}/{base}"
    print(f"  {'pair':<6}{base + ' tok/s':>14}{other + ' tok/s':>16}{ratio_name:>18}")
    paired = []
    for i, (d, a) in enumerate(zip(by_path[base], by_path[other], strict=True)):
        d_rate, a_rate = d.tokens / d.wall_s, a.tokens / a.wall_s
        paired.append(a_rate / d_rate)
        print(f"  {i + 1:<6}{d_rate:>14.1f}{a_rate:>16.1f}{paired[-1]:>18.3f}")
    for p, rs in by_path.items():
        ttft = statistics.median(a.first_chunk_s for r in rs for a in r.answers) * 1e3
        tokens = sum(r.tokens for r in rs)
        bench_ms = sum(r.bench_cpu_s for r in rs) / tokens * 1e3
        server_ms = sum(r.server_cpu_s for r in rs) / tokens * 1e3
        print(
            f"  {p:<9}{rate[p]:8.1f} tokens/s ({tokens} tokens)  first chunk p50 {ttft:5.1f} ms  "
            f"CPU ms/token: bench {bench_ms:.2f}, server {server_ms:.2f}"
        )
    same = all(
        a.text == b.text and a.tokens == b.tokens
        for d in by_path[base]
        for o in by_path[other]
        for a, b in zip(d.answers, o.answers, strict=True)
    )
    print(f"  same text and tokens on both paths: {'yes' if same else 'NO'}")
    ratio = statistics.median(paired)
    print(
        f"  {ratio_name}: {ratio:.3f} (median of pairs), {rate[other] / rate[base]:.3f} (totals)"
        f"   goal >= {goal}: {'met' if ratio >= goal else 'MISSED'}"
    )
    return ratio, same
