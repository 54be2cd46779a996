"""Benchmark: does vLLM's CPU build leave the rest of the machine CPU time while it generates?
vLLM unpinned vs on CPUs of its own (`--vllm-cpus`), side by side in one run.

For each layout one vLLM server, started as `tuneloop up --engine vllm` starts it, streams
`--answers` greedy answers of `--max-tokens` tokens straight to this process, one at a time. A
second process, standing for tuneloop's server or anything else on the machine, meanwhile sleeps
10 ms at a time and records how late it wakes. Pinned, vLLM runs on `--vllm-cpus` (default: the
first CPU) and this process and the sleeper on the others, as `tuneloop up --vllm-cpus` places
tuneloop.

Per layout: seconds to an answer's first text, the longest wait between two events of one answer,
how many answers sent their first text only after half their time (a client cannot leave such an
answer midway), tokens/s, and the sleeper's wake-up lateness. Then the ratios, pinned over
unpinned.

    python bench/vllm_stalls.py [--vllm-python PY] [--answers 12] [--max-tokens 400]
        [--vllm-cpus LIST] [--hidden-size 64] [--num-layers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import percentile, tiny_model
from vllm_streaming import add_vllm_and_model_args, fitting_prompts

from tuneloop.core.config import vllm_python_command
from tuneloop.core.cpu_affinity import format_cpu_list, keep_off, parse_cpu_list, run_on
from tuneloop.serve.vllm_server import VllmLaunch, VllmServer

# Sleeps 10 ms at a time until its stdin closes, then prints how late each wake-up was (seconds).
SLEEPER = """
import json, select, sys, time
late = []
while True:
    t = time.monotonic()
    if select.select([sys.stdin], [], [], 0.01)[0]:
        break
    late.append(time.monotonic() - t - 0.01)
print(json.dumps(late))
"""


@dataclass(frozen=True)
class Stream:
    first_text_s: float
    longest_gap_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True)
class Layout:
    name: str
    streams: list[Stream]
    lateness_s: list[float]  # sorted

    @property
    def late_first_text(self) -> int:
        return sum(s.first_text_s > s.total_s / 2 for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / sum(s.total_s for s in self.streams)


def stream(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Stream:
    """One greedy answer over SSE, timing every event as it arrives."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = last = time.monotonic()
    first, gap, tokens = math.nan, 0.0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            choices = event.get("choices")
            if math.isnan(first) and choices and choices[0]["delta"].get("content"):
                first = now - started
    return Stream(first, gap, time.monotonic() - started, tokens)


def measure(
    args: argparse.Namespace, model: Path, prompts: list[str], tmp: Path, cpus: frozenset[int]
) -> Layout:
    name = f"vLLM on CPU {format_cpu_list(cpus)}" if cpus else "unpinned"
    launch = VllmLaunch(vllm_python_command(args.vllm_python), str(model), cpus=cpus)
    vllm = VllmServer(launch, tmp / ("vllm-pinned" if cpus else "vllm-unpinned"))
    vllm.start()
    try:
        with vllm.endpoint.client(timeout=300.0) as client:
            stream(client, launch.served_name, prompts[0], args.max_tokens)  # warm-up
            sleeper = subprocess.Popen(
                [sys.executable, "-c", SLEEPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            streams = []
            for prompt in prompts:
                streams.append(stream(client, launch.served_name, prompt, args.max_tokens))
                s = streams[-1]
                print(
                    f"  {name}: first text {s.first_text_s:5.2f} s, longest gap "
                    f"{s.longest_gap_s:5.2f} s, {s.tokens} tokens in {s.total_s:5.2f} s"
                )
            lateness = sorted(json.loads(sleeper.communicate()[0]))
    finally:
        vllm.close()
    return Layout(name, streams, lateness)


def report(layouts: list[Layout]) -> None:
    print(
        f"{'layout':<16}{'first text s':>20}{'longest gap s':>20}{'late first':>12}"
        f"{'tok/s':>8}{'sleeper late ms':>22}"
    )
    print(f"{'':<16}{'median / max':>20}{'median / max':>20}{'text':>12}{'':>8}{'p99 / max':>22}")
    for lay in layouts:
        first = [s.first_text_s for s in lay.streams]
        gaps = [s.longest_gap_s for s in lay.streams]
        late = lay.lateness_s
        print(
            f"{lay.name:<16}{statistics.median(first):>11.3f} / {max(first):<6.3f}"
            f"{statistics.median(gaps):>11.3f} / {max(gaps):<6.3f}"
            f"{lay.late_first_text:>6} of {len(lay.streams):<3}{lay.tokens_per_s:>8.0f}"
            f"{percentile(late, 99) * 1e3:>13.1f} / {late[-1] * 1e3:<7.1f}"
        )
    unpinned, pinned = layouts
    ratios = {
        "longest gap (max)": max(s.longest_gap_s for s in pinned.streams)
        / max(s.longest_gap_s for s in unpinned.streams),
        "sleeper lateness (max)": pinned.lateness_s[-1] / unpinned.lateness_s[-1],
        "tokens/s": pinned.tokens_per_s / unpinned.tokens_per_s,
    }
    print("pinned / unpinned: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_vllm_and_model_args(parser, hidden_size=64, num_layers=2)  # the vLLM tests' model
    parser.add_argument("--answers", type=int, default=12, help="per layout")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument(
        "--vllm-cpus",
        metavar="LIST",
        help="the pinned layout's CPUs for vLLM (default: the first CPU this process may use)",
    )
    args = parser.parse_args(argv)
    allowed = frozenset(os.sched_getaffinity(0))
    cpus = parse_cpu_list(args.vllm_cpus) if args.vllm_cpus else frozenset({min(allowed)})
    if not cpus < allowed:
        parser.error(f"--vllm-cpus must leave this process some of CPUs {format_cpu_list(allowed)}")
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model or tiny_model(Path(tmp), args.hidden_size, args.num_layers)
        print(f"model: {model}  max_tokens: {args.max_tokens}  cpus: {format_cpu_list(allowed)}")
        prompts = fitting_prompts(model, args.answers, args.max_tokens)
        unpinned = measure(args, model, prompts, Path(tmp), frozenset())
        keep_off(cpus)  # this process and the sleeper, as tuneloop would be
        try:
            pinned = measure(args, model, prompts, Path(tmp), cpus)
        finally:
            run_on(allowed)
        report([unpinned, pinned])
    return 0


if __name__ == "__main__":
    sys.exit(main())
