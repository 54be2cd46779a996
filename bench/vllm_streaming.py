"""Benchmark: streaming chat through tuneloop's `POST /v1/chat/completions` vs straight to the same
vLLM server, in one run, at several concurrency levels.

One vLLM server (the interpreter from `--vllm-python`, default `tuneloop vllm-env`'s) serves the
model on a Unix socket, as `tuneloop up --engine vllm` would start it. `tuneloop up --engine vllm
--vllm-url unix:SOCKET` attaches to it in a process of its own. Both paths are HTTP clients in
this process, reading SSE as the `openai` client would:

- vllm: `POST /v1/chat/completions` on vLLM's socket, with its API key.
- tuneloop: the same request to tuneloop's port; tuneloop stores every answer in DuckDB too.

Greedy decoding, fixed `max_tokens`, MT-bench first turns. A round sends every prompt through one
path, `concurrency` at a time; the paths alternate round by round, and the ratio judged is the
median of the pairs' ratios (tokens/s of tuneloop over tokens/s of vLLM). CPU ms per token is
reported for this process, tuneloop's server, and vLLM's processes together.

Each round also prints vLLM's engine steps and the tokens each computed (its Prometheus histogram
`vllm:iteration_tokens_total`): on a CPU it keeps busy, vLLM sometimes runs a round in many small
steps instead of few large ones, on any path, and that, more than the path, sets the round's rate.

With `--proxy`, a third path streams through `bench/passthrough_proxy.py` (bytes forwarded, nothing
parsed or stored): what any Python gateway in front of vLLM costs on this machine.

With `--vllm-cpus LIST`, vLLM's processes run on those CPUs (as `tuneloop up --vllm-cpus` runs
them), and this process, tuneloop and the proxy on the others: vLLM and the gateway no longer take
CPU time from each other. It prints each gateway's own CPU ms per token.

Goal: tuneloop tokens/s >= 0.95 x vLLM tokens/s at every concurrency level.

    python bench/vllm_streaming.py [--vllm-python PY] [--model DIR] [--max-tokens 64]
        [--rounds 6] [--concurrency 1 8 32] [--proxy] [--vllm-cpus LIST]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from common import ServerProcess, cpu_seconds, free_port, tiny_model, wait_healthy
from sse_streams import MT_BENCH, Answer, Round, load_prompts, report, run_round, stream_answer

from tuneloop.cli_engine import default_vllm_env
from tuneloop.core.config import vllm_python_command
from tuneloop.core.cpu_affinity import keep_off, parse_cpu_list
from tuneloop.core.records import SamplingParams
from tuneloop.serve.vllm_server import VllmLaunch, VllmServer

GOAL_RATIO = 0.95


def group_pids(pgid: int) -> list[int]:
    """The processes of one process group (vLLM's API server, engine core and worker)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(entry)) == pgid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def passthrough_proxy(
    socket_path: str | None, api_key: str | None
) -> Iterator[tuple[httpx.Client, int]]:
    """bench/passthrough_proxy.py in a process of its own; a client for it, and its pid."""
    port = free_port()
    script = Path(__file__).with_name("passthrough_proxy.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(socket_path), str(port)],
        env=os.environ | {"VLLM_API_KEY": api_key or ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60)
        limits = httpx.Limits(max_connections=None, keepalive_expiry=2.0)
        with httpx.Client(base_url=url, timeout=300.0, limits=limits) as client:
            yield client, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def engine_steps(client: httpx.Client) -> tuple[float, float]:
    """vLLM's engine steps so far and the tokens they computed, from its `/metrics`."""
    text = client.get("/metrics").text
    found = [
        re.search(rf"^vllm:iteration_tokens_total_{part}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        for part in ("count", "sum")
    ]
    if not all(found):
        raise RuntimeError("vLLM's /metrics has no vllm:iteration_tokens_total")
    steps, tokens = (float(m.group(1)) for m in found if m)
    return steps, tokens


def stepped_round(direct: httpx.Client, path: str, *round_args: Any) -> Round:
    """`run_round`, printing how many engine steps vLLM took for it."""
    before = engine_steps(direct)
    result = run_round(path, *round_args)
    steps, tokens = (b - a for a, b in zip(before, engine_steps(direct), strict=True))
    print(
        f"    {path:<9}{result.tokens / result.wall_s:7.0f} tok/s   vLLM: {steps:5.0f} engine "
        f"steps, {tokens / max(steps, 1):5.1f} tokens per step"
    )
    return result


def fitting_prompts(model: Path, n: int, max_tokens: int) -> list[str]:
    """`n` prompts (cycling) whose answers of `max_tokens` fit the model's context: vLLM refuses
    the others outright, where tuneloop would shorten the answer."""
    from tuneloop.core.artifacts import load_tokenizer

    tokenizer = load_tokenizer(model)
    room = tokenizer.model_max_length - max_tokens

    def fits(prompt: str) -> bool:
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        return len(ids) <= room

    candidates = [p for p in dict.fromkeys(load_prompts(200)) if fits(p)]
    return [candidates[i % len(candidates)] for i in range(n)]


def run(args: argparse.Namespace, model: Path, tmp: Path) -> int:
    cpus = parse_cpu_list(args.vllm_cpus) if args.vllm_cpus else frozenset()
    launch = VllmLaunch(vllm_python_command(args.vllm_python), str(model), cpus=cpus)
    keep_off(cpus)  # this process and those it starts: tuneloop, the proxy
    vllm = VllmServer(launch, tmp / "vllm")
    vllm.start()
    endpoint = vllm.endpoint
    prompts = fitting_prompts(model, 2 * max(args.concurrency), args.max_tokens)
    params = SamplingParams(args.max_tokens, 0.0, 1.0)
    attach = ["--engine", "vllm", "--vllm-url", f"unix:{endpoint.uds}"]
    # Idle connections go before the servers' 5 s keep-alive closes them under a reused request.
    limits = httpx.Limits(max_connections=max(args.concurrency), keepalive_expiry=2.0)
    try:
        with (
            contextlib.ExitStack() as stack,
            ServerProcess(
                model,
                tmp / "server",
                max_concurrency=max(args.concurrency),
                args=attach,
                env={"VLLM_API_KEY": endpoint.api_key or ""},
            ) as server,
            endpoint.client(timeout=300.0) as direct,
            httpx.Client(
                base_url=server.url, headers=server.auth, timeout=300.0, limits=limits
            ) as api,
        ):
            paths: dict[str, Callable[[str], Answer]] = {
                "vllm": lambda p: stream_answer(direct, p, params, model=launch.served_name),
                "tuneloop": lambda p: stream_answer(api, p, params),
            }
            if args.proxy:
                proxy, proxy_pid = stack.enter_context(
                    passthrough_proxy(endpoint.uds, endpoint.api_key)
                )
                paths["proxy"] = lambda p: stream_answer(proxy, p, params, model="base")
            for answer in paths.values():  # warm-up, not measured
                answer(prompts[0])
            pids = [server.pid, *group_pids(vllm.pid or 0)]
            print(
                f"model: {model}  max_tokens: {args.max_tokens}  prompts per round: twice "
                f"the concurrency ({'MT-bench' if MT_BENCH.exists() else 'built-in'})  "
                f"rounds per path: {args.rounds}  cpus: {os.cpu_count()}"
            )
            results = []
            for concurrency in args.concurrency:
                level = prompts[: max(2 * concurrency, 4)]
                gateways = {"tuneloop": server.pid} | ({"proxy": proxy_pid} if args.proxy else {})
                cpu_before = {path: cpu_seconds(pid) for path, pid in gateways.items()}
                names = list(paths)
                print(f"concurrency {concurrency}: rounds")
                rounds = [  # each round a rotation of the paths' order
                    stepped_round(direct, path, paths[path], level, concurrency, pids)
                    for i in range(args.rounds)
                    for path in names[i % len(names) :] + names[: i % len(names)]
                ]
                tuneloop_rounds = [r for r in rounds if r.path != "proxy"]
                results.append(report(tuneloop_rounds, concurrency, GOAL_RATIO, "vllm", "tuneloop"))
                for path, pid in gateways.items():  # each idle in the other paths' rounds
                    used = cpu_seconds(pid) - cpu_before[path]
                    tokens = sum(r.tokens for r in rounds if r.path == path)
                    print(f"  {path}'s own process: {used / tokens * 1e3:.2f} CPU ms/token")
                if args.proxy:
                    print("  for reference, a pass-through proxy (bench/passthrough_proxy.py):")
                    report(
                        [r for r in rounds if r.path != "tuneloop"],
                        concurrency,
                        GOAL_RATIO,
                        "vllm",
                        "proxy",
                    )
    finally:
        vllm.close()
    met = all(ratio >= GOAL_RATIO for ratio, _ in results)
    summary = ", ".join(
        f"c={c}: {ratio:.3f}" for c, (ratio, _) in zip(args.concurrency, results, strict=True)
    )
    print(
        f"goal: tuneloop tokens/s >= {GOAL_RATIO} x vLLM: {'met' if met else 'MISSED'} ({summary})"
    )
    return 0 if all(same for _, same in results) else 1


def add_vllm_and_model_args(
    parser: argparse.ArgumentParser, hidden_size: int, num_layers: int
) -> None:
    """The vLLM benchmarks' `--vllm-python`, `--model` and the default model's size."""
    parser.add_argument(
        "--vllm-python",
        default=str(default_vllm_env() / "bin" / "python"),
        help="vLLM's interpreter (default: %(default)s, made by `tuneloop vllm-env`)",
    )
    parser.add_argument("--model", type=Path, help="model dir (default: a tiny random model)")
    parser.add_argument("--hidden-size", type=int, default=hidden_size, help="of the default model")
    parser.add_argument("--num-layers", type=int, default=num_layers, help="of the default model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_vllm_and_model_args(parser, hidden_size=256, num_layers=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--vllm-cpus",
        metavar="LIST",
        help="run vLLM's processes on these CPUs (as tuneloop's --vllm-cpus), tuneloop, the "
        "proxy and this benchmark's clients on the others",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="also stream through a bare pass-through proxy, as a reference point",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = args.model or tiny_model(Path(tmp), args.hidden_size, args.num_layers)
        return run(args, model, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
