"""Benchmark: decode speed of the embedded engine and of vLLM's CPU build against the machine's
memory-bandwidth bound, side by side in one run.

On a CPU, decoding one token reads every weight once, so one stream can go no faster than
memory bandwidth / weight bytes. This run measures, in rounds that interleave everything:

1. Memory copy bandwidth: a 512 MB fp32 tensor copied into another (`Tensor.copy_`), best of
   `--copies`, counted as bytes read + bytes written (2 x 512 MB per copy, the STREAM "copy"
   convention), with torch's default threads (all cores) and with one thread.
2. The decode bound for one stream: bandwidth / weight bytes (parameters x element size, tied
   embeddings counted once; the tied LM head reads the whole embedding matrix every step).
   A batched step reads the same weights once for every row, so an aggregate over several
   streams can exceed it.
3. The embedded engine (`EmbeddedEngine`, continuous batching) at each `--streams` level: that
   many threads start together, each streaming one greedy answer of `--new-tokens` tokens to a
   different MT-bench first turn (`../shared/data/mt-bench/questions.jsonl`, else built-in
   prompts). Plain `model.generate` (batch 1, greedy, the same prompt and token budget) is a
   reference row.
4. vLLM's CPU build (`--vllm-python`, default `tuneloop vllm-env`'s), started as `tuneloop up
   --engine vllm` starts it (`VllmServer` on a Unix socket, dtype float32) and read through
   tuneloop's `VllmEngine.stream()`, at the same levels. With `--vllm-cpus LIST` it runs on those
   CPUs (as `tuneloop up --vllm-cpus`), and during its rounds this process moves to the others;
   `--vllm-env KEY=VALUE` adds to its environment (e.g. `VLLM_CPU_OMP_THREADS_BIND=0-1`: on 2
   cores vLLM's default binding computes on one core and keeps the other for its API server).
5. llama-cpp-python at 1 stream, only if it is importable and `--gguf FILE` is given.

Rates: "e2e" = all completion tokens / wall time from the first request to the last token
(prefill included). "decode" = tokens produced while every stream of the round was past its
first token and none had ended, over that window (at 1 stream: tokens after the first / time
from the first token to the last); "per stream" = decode / streams. Each row reports its best
round (highest decode tokens/s) and the bound uses the best bandwidth: noise from other work on
the machine only ever slows a round down. Every round is printed as well.

The table's "x bound" divides by the bound on all cores, "x 1-core bound" by the bound from the
one-thread bandwidth (vLLM's default binding computes on one core of two). The process runs under
tuneloop's OpenMP defaults (`OMP_WAIT_POLICY=PASSIVE` unless the environment says otherwise),
which vLLM inherits, as under `tuneloop up`; `GOMP_SPINCOUNT=10000 python bench/decode_speed.py`
measures with spinning threads instead. `--profile` ends with a torch.profiler table of decode
steps called the way the embedded engine calls the model at 1 stream (in this process's main
thread), beside the time of its linear layers alone and of reading its weights alone.

    python bench/decode_speed.py [--model smollm2] [--new-tokens 128] [--streams 1 8]
        [--rounds 2] [--vllm-python PY | --no-vllm] [--vllm-cpus LIST]
        [--vllm-env KEY=VALUE ...] [--gguf FILE] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import cpu_seconds
from sse_streams import MT_BENCH, load_prompts
from vllm_streaming import group_pids

from tuneloop.cli_engine import default_vllm_env
from tuneloop.core.config import apply_openmp_defaults, vllm_python_command
from tuneloop.core.cpu_affinity import keep_off, parse_cpu_list, run_on
from tuneloop.core.records import Message, SamplingParams

COPY_MB = 512
EMBEDDED, GENERATE, VLLM, LLAMA_CPP = "embedded", "hf generate", "vllm", "llama.cpp"


@dataclass
class StreamTiming:
    """One streamed answer: perf_counter times, its completion tokens, and (time, tokens so far)
    at every chunk."""

    started: float
    first: float = math.nan
    ended: float = math.nan
    tokens: int = 0
    text: str = ""
    marks: list[tuple[float, int]] = field(default_factory=list)

    def tokens_at(self, t: float) -> int:
        """Tokens produced by time `t` (as far as the chunks tell)."""
        count = 0
        for when, n in self.marks:
            if when > t:
                break
            count = n
        return count


@dataclass(frozen=True)
class RoundResult:
    engine: str
    streams: int
    round: int
    tokens: int
    wall_s: float
    e2e_tps: float
    decode_tps: float
    ttft_p50_s: float

    @property
    def per_stream_tps(self) -> float:
        return self.decode_tps / self.streams


def summarize(engine: str, round_no: int, timings: list[StreamTiming]) -> RoundResult:
    """Rates of one round (see the module docstring for the definitions)."""
    start = min(t.started for t in timings)
    end = max(t.ended for t in timings)
    tokens = sum(t.tokens for t in timings)
    window_start = max(t.first for t in timings)  # every stream is decoding ...
    window_end = min(t.ended for t in timings)  # ... and none has ended
    decode = math.nan
    if window_end > window_start:
        made = sum(t.tokens_at(window_end) - t.tokens_at(window_start) for t in timings)
        decode = made / (window_end - window_start)
    ttft = statistics.median(t.first - t.started for t in timings)
    return RoundResult(
        engine, len(timings), round_no, tokens, end - start, tokens / (end - start), decode, ttft
    )


def timed_stream(
    chunks: Iterable[str], started: float, tokens_so_far: Callable[[int], int]
) -> StreamTiming:
    """Read `chunks` to the end, timing each; `tokens_so_far(i)` after chunk i."""
    timing = StreamTiming(started)
    parts = []
    for i, chunk in enumerate(chunks):
        now = time.perf_counter()
        if not parts:
            timing.first = now
        parts.append(chunk)
        timing.marks.append((now, tokens_so_far(i)))
    timing.ended = time.perf_counter()
    if not parts:  # an answer that ended at once
        timing.first = timing.ended
    timing.text = "".join(parts)
    return timing


def engine_round(engine: Any, prompts: list[str], params: SamplingParams) -> list[StreamTiming]:
    """One answer per prompt, all streams started together from threads of their own."""
    barrier = threading.Barrier(len(prompts))
    timings: list[StreamTiming | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            started = time.perf_counter()
            generation = engine.stream([Message("user", prompts[i])], params)
            # The embedded engine counts tokens as it goes; vLLM's count comes with its last
            # event, and until then each event is one token.
            timing = timed_stream(
                generation, started, lambda n: max(generation.completion_tokens, n + 1)
            )
            timing.tokens = generation.completion_tokens
            timing.marks = [(t, min(n, timing.tokens)) for t, n in timing.marks]
            timing.marks.append((timing.ended, timing.tokens))
            timings[i] = timing
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [t for t in timings if t is not None]


class Reference:
    """Plain transformers: `model.generate` at batch 1, greedy, timing every new token."""

    def __init__(self, model_dir: Path) -> None:
        import torch

        from tuneloop.core.artifacts import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model_dir, dtype=torch.float32)
        self.tokenizer = load_tokenizer(model_dir)

    @property
    def weight_bytes(self) -> int:
        """Every parameter once (`parameters()` yields a tied weight once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, prompt: str) -> Any:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def generate(self, prompt: str, new_tokens: int) -> StreamTiming:
        from transformers.generation.streamers import BaseStreamer

        timing = StreamTiming(time.perf_counter())
        produced: list[int] = []

        class Clock(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate hands the prompt over first
                    self.prompt_seen = True
                    return
                produced.extend(value.reshape(-1).tolist())
                timing.marks.append((time.perf_counter(), len(produced)))

            def end(self) -> None:
                pass

        ids = self.encode(prompt)
        self.model.generate(
            ids,
            attention_mask=ids.new_ones(ids.shape),
            max_new_tokens=new_tokens,
            do_sample=False,
            streamer=Clock(),
        )
        eos = set(_as_list(self.model.generation_config.eos_token_id))
        kept = [t for t in produced if t not in eos]  # the engines count no end-of-answer token
        timing.ended = timing.marks[-1][0]
        timing.first = timing.marks[0][0]
        timing.tokens = len(kept)
        timing.marks[-1] = (timing.ended, len(kept))
        timing.text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return timing

    def profile(self, prompt: str, steps: int, bound_s: float) -> None:
        """Decode steps called as the embedded engine calls the model at 1 stream (`DecodeLoop.
        _step`: a 2-D mask, explicit positions, a DynamicCache), under torch.profiler."""
        import torch
        from transformers import DynamicCache

        model = self.model
        with torch.inference_mode():
            ids = self.encode(prompt)
            cache = DynamicCache()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            state = {"mask": torch.ones(1, ids.shape[1], dtype=torch.long), "logits": logits}

            def step() -> None:
                last = state["logits"][:, -1, :].argmax(dim=-1, keepdim=True)
                mask = torch.cat([state["mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
                state["mask"] = mask
                state["logits"] = model(
                    input_ids=last,
                    attention_mask=mask,
                    position_ids=mask.sum(dim=1, keepdim=True) - 1,
                    past_key_values=cache,
                    use_cache=True,
                ).logits

            for _ in range(3):
                step()
            step_s = _best_time(step, steps)
            weights = [p for p in model.parameters() if p.dim() == 2]
            inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
            linear_s = _best_time(
                lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights], 5
            )
            read_s = _best_time(lambda: [w.sum() for w in weights], 5)
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
        print(
            f"\nprofile: one decode step at 1 stream, best of {steps} (context "
            f"{ids.shape[1]}+ tokens, torch threads {torch.get_num_threads()}):\n"
            f"  whole step      {step_s * 1e3:7.1f} ms  ({1 / step_s:5.1f} tok/s)\n"
            f"  its {len(weights)} matrices' F.linear alone (one row) {linear_s * 1e3:7.1f} ms\n"
            f"  reading those matrices alone (Tensor.sum each) {read_s * 1e3:7.1f} ms\n"
            f"  the bound (weight bytes / copy bandwidth) {bound_s * 1e3:7.1f} ms\n"
            f"torch.profiler over {steps} steps (self CPU time):"
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def copy_bandwidth(threads: int, copies: int) -> float:
    """Bytes/s of `Tensor.copy_` between two COPY_MB fp32 tensors on `threads` threads, best of
    `copies`, counting bytes read + bytes written."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = COPY_MB * 2**20 // 4
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)  # first touch of the pages: not timed
        best = _best_time(lambda: dst.copy_(src), copies)
        return 2 * n * 4 / best
    finally:
        torch.set_num_threads(before)


class LlamaCpp:
    """llama-cpp-python on a GGUF file, read with its streaming chat API (1 stream)."""

    def __init__(self, gguf: Path) -> None:
        from llama_cpp import Llama

        self.weight_bytes = gguf.stat().st_size
        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)

    def stream(self, messages: list[Message], params: SamplingParams) -> _LlamaCppGeneration:
        return _LlamaCppGeneration(self.llm, messages, params)


class _LlamaCppGeneration:
    def __init__(self, llm: Any, messages: list[Message], params: SamplingParams) -> None:
        self.completion_tokens = 0
        self._events = llm.create_chat_completion(
            [{"role": m.role, "content": m.content} for m in messages],
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            stream=True,
        )

    def __iter__(self) -> Iterator[str]:
        for event in self._events:  # one event per token
            text = event["choices"][0]["delta"].get("content")
            if text:
                self.completion_tokens += 1
                yield text


@contextlib.contextmanager
def vllm_engine(args: argparse.Namespace, model: Path, run_dir: Path) -> Iterator[tuple[Any, int]]:
    """A VllmEngine over a VllmServer started as `tuneloop up --engine vllm` starts it, and the
    server's pid (its process group holds the engine core and the worker)."""
    from tuneloop.serve.vllm_engine import VllmEngine
    from tuneloop.serve.vllm_server import VllmLaunch, VllmServer

    launch = VllmLaunch(
        vllm_python_command(args.vllm_python),
        str(model),
        dtype="float32",
        cpus=args.cpus,
        env=dict(args.vllm_env),
    )
    server = VllmServer(launch, run_dir)
    started = time.perf_counter()
    try:
        server.start()
        print(f"vLLM ready in {time.perf_counter() - started:.0f} s (log: {server.log_path})")
        yield VllmEngine(server, "bench", model), server.pid or 0
    finally:
        server.close()


@contextlib.contextmanager
def off_vllm_cpus(cpus: frozenset[int]) -> Iterator[None]:
    """This process off vLLM's CPUs for the duration (its clients, as tuneloop's would be)."""
    if not cpus:
        yield
        return
    allowed = frozenset(os.sched_getaffinity(0))
    keep_off(cpus)
    try:
        yield
    finally:
        run_on(allowed)


def fmt(value: float, spec: str = ".1f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def print_table(
    best: dict[tuple[str, int], RoundResult],
    bandwidth: float,
    bandwidth_1: float,
    weights: dict[str, int],
) -> None:
    """Markdown table of each row's best round; bounds from each engine's own weight bytes."""
    print(
        "\n| engine | streams | e2e tok/s | decode tok/s | per stream | x bound | x 1-core bound "
        "| first token p50 | vLLM/embedded decode (e2e) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for (engine, streams), r in best.items():
        ratio = ""
        if engine == VLLM and (EMBEDDED, streams) in best:
            e = best[(EMBEDDED, streams)]
            ratio = f"{fmt(r.decode_tps / e.decode_tps, '.2f')} ({r.e2e_tps / e.e2e_tps:.2f})"
        bound, bound_1 = bandwidth / weights[engine], bandwidth_1 / weights[engine]
        print(
            f"| {engine} | {streams} | {r.e2e_tps:.1f} | {fmt(r.decode_tps)} | "
            f"{fmt(r.per_stream_tps)} | {fmt(r.decode_tps / bound, '.2f')} | "
            f"{fmt(r.decode_tps / bound_1, '.2f')} | {r.ttft_p50_s * 1e3:.0f} ms | {ratio} |"
        )


@dataclass
class Measured:
    """Everything the rounds measured."""

    rounds: list[RoundResult] = field(default_factory=list)
    bandwidths: list[tuple[float, float]] = field(default_factory=list)  # all threads, 1 thread
    texts: dict[str, str] = field(default_factory=dict)  # each engine's 1-stream answer
    vllm_idle_cpu_s: float = 0.0  # vLLM's CPU time during the other engines' rounds


def jobs_at(
    streams: int,
    engines: dict[str, Any],
    reference: Reference,
    prompts: list[str],
    params: SamplingParams,
) -> list[tuple[str, Callable[[], list[StreamTiming]]]]:
    """What runs at one level, in order: each engine, and `generate` after the embedded one."""
    jobs: list[tuple[str, Callable[[], list[StreamTiming]]]] = []
    for name, engine in engines.items():
        if name == LLAMA_CPP and streams != 1:
            continue
        jobs.append((name, functools.partial(engine_round, engine, prompts[:streams], params)))
        if name == EMBEDDED and streams == 1:
            jobs.append((GENERATE, lambda: [reference.generate(prompts[0], params.max_tokens)]))
    return jobs


def measure(
    args: argparse.Namespace,
    engines: dict[str, Any],
    reference: Reference,
    prompts: list[str],
    vllm_pids: list[int],
) -> Measured:
    """`args.rounds` rounds: the bandwidth, then every engine at every level."""
    import torch

    params = SamplingParams(args.new_tokens, 0.0, 1.0)
    threads = torch.get_num_threads()
    for name, engine in engines.items():  # warm-up, not measured
        with off_vllm_cpus(args.cpus if name == VLLM else frozenset()):
            engine_round(engine, prompts[:1], SamplingParams(8, 0.0, 1.0))
    reference.generate(prompts[0], 8)

    def vllm_cpu() -> float:
        return sum(cpu_seconds(p) for p in vllm_pids if Path(f"/proc/{p}").exists())

    out = Measured()
    for round_no in range(1, args.rounds + 1):
        bw = copy_bandwidth(threads, args.copies), copy_bandwidth(1, args.copies)
        out.bandwidths.append(bw)
        print(
            f"round {round_no}: copy bandwidth {bw[0] / 1e9:.1f} GB/s ({threads} threads), "
            f"{bw[1] / 1e9:.1f} GB/s (1 thread)"
        )
        for streams in args.streams:
            for name, job in jobs_at(streams, engines, reference, prompts, params):
                vllm_before = vllm_cpu()
                with off_vllm_cpus(args.cpus if name == VLLM else frozenset()):
                    timings = job()
                if name != VLLM:
                    out.vllm_idle_cpu_s += vllm_cpu() - vllm_before
                if streams == 1:
                    out.texts[name] = timings[0].text
                r = summarize(name, round_no, timings)
                out.rounds.append(r)
                print(
                    f"  {name:<12}{streams:>3} streams: {r.tokens:5d} tokens in {r.wall_s:6.2f} s"
                    f"  e2e {r.e2e_tps:6.1f} tok/s  decode {fmt(r.decode_tps):>6} tok/s  "
                    f"first token p50 {r.ttft_p50_s * 1e3:5.0f} ms"
                )
    if vllm_pids:
        print(f"vLLM's processes used {out.vllm_idle_cpu_s:.1f} CPU s while the others ran")
    return out


def best_rounds(rounds: list[RoundResult]) -> dict[tuple[str, int], RoundResult]:
    """Each (engine, streams) row's round with the highest decode rate, rows in table order."""
    best: dict[tuple[str, int], RoundResult] = {}
    for r in rounds:
        key = (r.engine, r.streams)
        old = best.get(key)
        if old is None or _rate(r) > _rate(old):
            best[key] = r
    order = [EMBEDDED, GENERATE, VLLM, LLAMA_CPP]
    return dict(sorted(best.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))))


def _rate(r: RoundResult) -> tuple[float, float]:
    return (-math.inf if math.isnan(r.decode_tps) else r.decode_tps, r.e2e_tps)


def report(
    args: argparse.Namespace, measured: Measured, weights: dict[str, int], threads: int
) -> dict[str, Any]:
    """Print the summary and the table; the results as a dict for `--json`."""
    weight_bytes = weights[EMBEDDED]
    bw = max(b[0] for b in measured.bandwidths)
    bw_1 = max(b[1] for b in measured.bandwidths)
    bound, bound_1 = bw / weight_bytes, bw_1 / weight_bytes
    best = best_rounds(measured.rounds)
    print(
        f"\nbandwidth (Tensor.copy_ of {COPY_MB} MB fp32, bytes read + bytes written, best of "
        f"{len(measured.bandwidths)} rounds): {bw / 1e9:.1f} GB/s on {threads} threads, "
        f"{bw_1 / 1e9:.1f} GB/s on 1\n"
        f"decode bound, one stream: {bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.1f} MB = "
        f"{bound:.1f} tok/s ({bound_1:.1f} tok/s on one core)\n"
        f"each row: its best of {args.rounds} rounds (highest decode tok/s); x bound = decode "
        "tok/s (aggregate) over the one-stream bound"
    )
    print_table(best, bw, bw_1, weights)
    texts = measured.texts
    if EMBEDDED in texts and len(texts) > 1:
        same = ", ".join(
            f"{name} {'yes' if text == texts[EMBEDDED] else 'NO'}"
            for name, text in texts.items()
            if name != EMBEDDED
        )
        print(f"\n1 stream, same text as the embedded engine (last round): {same}")
    return {
        "weight_bytes": weights,
        "new_tokens": args.new_tokens,
        "bandwidth_convention": "Tensor.copy_ of 512 MB fp32: bytes read + bytes written / s",
        "copy_bandwidth_bytes_per_s": {"all_threads": bw, "one_thread": bw_1},
        "bound_tokens_per_s": {"all_threads": bound, "one_thread": bound_1},
        "best_round_per_row": [
            asdict(r) | {"per_stream_tps": r.per_stream_tps} for r in best.values()
        ],
        "rounds": [asdict(r) for r in measured.rounds],
        "bandwidth_rounds": measured.bandwidths,
        "vllm_idle_cpu_s": measured.vllm_idle_cpu_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tuneloop.models import resolve_model
    from tuneloop.serve.engine import EmbeddedEngine

    model = Path(resolve_model(args.model))
    all_prompts = list(dict.fromkeys(load_prompts(200)))
    prompts = [all_prompts[i % len(all_prompts)] for i in range(max(args.streams))]
    reference = Reference(model)
    weight_bytes = reference.weight_bytes
    engines: dict[str, Any] = {
        EMBEDDED: EmbeddedEngine(model, "bench", max_concurrency=max(args.streams))
    }
    weights = {EMBEDDED: weight_bytes, GENERATE: weight_bytes, VLLM: weight_bytes}
    skipped: dict[str, str] = {}
    if args.gguf is None:
        skipped[LLAMA_CPP] = "no --gguf file given"
    elif importlib.util.find_spec("llama_cpp") is None:
        skipped[LLAMA_CPP] = "llama_cpp is not importable"
    else:
        engines[LLAMA_CPP] = LlamaCpp(args.gguf)
        weights[LLAMA_CPP] = engines[LLAMA_CPP].weight_bytes
    vllm_python = Path(args.vllm_python) if args.vllm_python else None
    if args.no_vllm:
        skipped[VLLM] = "--no-vllm"
    elif vllm_python is None or not vllm_python.exists():
        skipped[VLLM] = f"no vLLM interpreter at {vllm_python} (make one with `tuneloop vllm-env`)"
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    with contextlib.ExitStack() as stack:
        vllm_pids: list[int] = []
        if VLLM not in skipped:
            run_dir = args.run_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="tuneloop-bench-"))
            )
            engines[VLLM], pgid = stack.enter_context(vllm_engine(args, model, run_dir / "vllm"))
            vllm_pids = group_pids(pgid)
        print(
            f"model: {model}  weights: {weight_bytes / 1e6:.1f} MB "
            f"({weight_bytes // 4 / 1e6:.1f}M fp32 parameters, tied counted once)  new tokens: "
            f"{args.new_tokens}  prompts: {'MT-bench' if MT_BENCH.exists() else 'built-in'} "
            f"first turns  cpus: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  "
            + "  ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if "OMP_" in k)
        )
        measured = measure(args, engines, reference, prompts, vllm_pids)
    results = report(args, measured, weights, torch.get_num_threads())
    if args.profile:
        bw = results["copy_bandwidth_bytes_per_s"]["all_threads"]
        reference.profile(prompts[0], args.profile_steps, weight_bytes / bw)
    return {"model": str(model), "skipped": skipped} | results


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="name or dir (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="per answer")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="of everything, interleaved")
    parser.add_argument("--copies", type=int, default=6, help="timed copies per bandwidth test")
    vllm_python = default_vllm_env() / "bin" / "python"
    parser.add_argument(
        "--vllm-python",
        default=str(vllm_python) if vllm_python.exists() else None,
        help=f"vLLM's interpreter (default: {vllm_python}, if it exists)",
    )
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM out")
    parser.add_argument(
        "--vllm-cpus",
        metavar="LIST",
        help="run vLLM's processes on these CPUs (as tuneloop's --vllm-cpus); this process "
        "moves to the others during vLLM's rounds",
    )
    parser.add_argument(
        "--vllm-env",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add to vLLM's environment (repeatable), e.g. VLLM_CPU_OMP_THREADS_BIND=0-1",
    )
    parser.add_argument("--gguf", type=Path, help="a GGUF file for the llama-cpp-python row")
    parser.add_argument("--profile", action="store_true", help="profile embedded decode steps")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument(
        "--run-dir", type=Path, help="keep vLLM's log here (default: a temporary dir)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    args.cpus = parse_cpu_list(args.vllm_cpus) if args.vllm_cpus else frozenset()
    apply_openmp_defaults(os.environ)  # before torch loads, as the tuneloop command does
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
