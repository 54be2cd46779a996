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

Both processes run under the OpenMP settings the `tuneloop` command gives itself
(`tuneloop.core.config.OPENMP_DEFAULTS`: sleeping idle threads; a value already in the environment
wins and reaches the server too), so the ratio measures the API and not a difference in OpenMP's
waiting. `--torch-threads N` sets the intra-op threads of both processes (default: torch's choice,
as `tuneloop up` runs).

Goal: api tokens/s >= 0.9 x direct tokens/s.

    python bench/chat_streaming.py [--model DIR] [--max-tokens 64] [--prompts 4] [--rounds 8]
        [--concurrency 1 4] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from common import ServerProcess, tiny_model
from sse_streams import MT_BENCH, Answer, load_prompts, report, run_round, stream_answer

from tuneloop.core.config import apply_openmp_defaults
from tuneloop.core.records import Message, SamplingParams

if TYPE_CHECKING:
    from tuneloop.serve.engine import EmbeddedEngine

GOAL_RATIO = 0.9


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


def run(args: argparse.Namespace, model: Path, tmp: Path) -> int:
    import torch

    from tuneloop.serve.engine import EmbeddedEngine

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
            headers=server.auth,
            timeout=300.0,
            limits=httpx.Limits(max_connections=max(args.concurrency)),
        ) as client,
    ):
        paths: dict[str, Callable[[str], Answer]] = {
            "direct": lambda p: direct_answer(engine, p, params),
            "api": lambda p: stream_answer(client, p, params),
        }
        for answer in paths.values():  # warm-up, not measured
            answer(prompts[0])
        print(
            f"model: {model}  max_tokens: {args.max_tokens}  prompts: {len(prompts)} "
            f"({'MT-bench' if MT_BENCH.exists() else 'built-in'})  rounds per path: "
            f"{args.rounds}  cpus: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  "
            + "  ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if "OMP_" in k)
        )
        results = []
        for concurrency in args.concurrency:
            rounds = [
                run_round(path, paths[path], prompts, concurrency, [server.pid])
                for i in range(args.rounds)
                for path in (("direct", "api") if i % 2 == 0 else ("api", "direct"))
            ]
            results.append(report(rounds, concurrency, GOAL_RATIO))
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
    apply_openmp_defaults(os.environ)  # before torch loads, here and in the server
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model or tiny_model(Path(tmp), args.hidden_size, args.num_layers)
        return run(args, model, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
