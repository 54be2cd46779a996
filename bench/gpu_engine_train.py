"""Benchmark for a GPU machine (runs on a CPU too): the embedded engine's decode rate against the
memory-bandwidth limit, and DPO tokens/s through tuneloop's own job, on a 0.5B-class Llama built
from a config with random weights.

The GPU machine has no package registry and no `../shared/data`, so the work is in two steps:

    python bench/gpu_engine_train.py prepare DIR [--pairs 512] [--vocab 32000]
    python bench/gpu_engine_train.py run DIR [--device cuda] [--size 0.5b|tiny] [--new-tokens 256]
        [--batches 1 8] [--dpo-steps 30] [--dpo-batch 8] [--max-length 512]

`prepare` (here) trains the byte-level BPE tokenizer the demo model uses, at `--vocab`, and builds
the DPO datasets the product builds from real preference pairs (`../shared/data/hh-rlhf-harmless`:
`import_preferences`, `create_snapshot`, `build_datasets`) into DIR, a few MB to carry.

`run` (there) builds the model from a config (`--size 0.5b`: hidden 1024, 28 layers, MLP 4096,
0.50 B parameters with the 32k vocabulary; `tiny` for a check on a CPU), then measures, in one run:

- the device's memory bandwidth: a `copy_` of a large buffer, bytes read and written per second;
- decode: `EmbeddedEngine` (bf16 on CUDA, float32 on a CPU) answering `--new-tokens` greedy
  tokens for 1 and 8 concurrent requests. Each decode step reads every weight once, so one batch
  can step at most bandwidth / weight bytes times a second: the limit printed, against the
  measured steps/s. A random model may end an answer early; only tokens generated are counted;
- DPO: `train_version(JobSpec("dpo", ...))`, the product's job (LoRA, reference model, status
  callback), for `--dpo-steps` steps; tokens/s = the manifest's `train_tokens` (TRL's
  `num_tokens`: prompt and both answers, no padding) over `train_runtime_s` (`trainer.train()`'s
  own runtime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {  # hidden, layers, MLP width
    "0.5b": (1024, 28, 4096),
    "tiny": (128, 4, 512),
}
PROMPTS = [
    "Explain how a hash table works.",
    "Write a short poem about the sea.",
    "What is the difference between a list and a tuple?",
    "Summarise the causes of the French Revolution.",
    "How do I reverse a string in Python?",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Give three tips for a job interview.",
]


def prepare(out: Path, pairs: int, vocab: int) -> None:
    # Here only: the GPU machine, which runs `run`, may lack common.py's HTTP client.
    from common import PAIRS_FILE, preference_datasets

    from tuneloop.train.tiny_model import local_corpus, train_tokenizer

    if not PAIRS_FILE.exists():
        sys.exit(f"{PAIRS_FILE} is missing: it comes with ../shared/data")
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(local_corpus(4_000_000), vocab).save_pretrained(out / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        built = preference_datasets(Path(tmp), pairs)
        (out / "datasets").mkdir(exist_ok=True)
        for split in (built.train, built.heldout):
            (out / "datasets" / split.name).write_bytes(split.read_bytes())
    print(f"{built.train_rows} train / {built.heldout_rows} held out")
    print(f"wrote {out}; carry it to the GPU machine and run: {Path(__file__).name} run {out}")


def build_model(prepared: Path, size: str, out: Path) -> int:
    """The model of `size` with the prepared tokenizer, saved into `out`; its parameter count."""
    from transformers import AutoTokenizer

    from tuneloop.train.tiny_model import new_llama

    hidden, layers, mlp = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    model = new_llama(
        tokenizer,
        seed=0,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=mlp,
        max_position_embeddings=2048,
    )
    tokenizer.model_max_length = 2048
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model.num_parameters()


def copy_bandwidth(device: str) -> float:
    """Bytes read plus written per second by `copy_` of a buffer far larger than any cache."""
    import torch

    n = (1 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(8):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:  # after warm-up
            times.append(time.perf_counter() - start)
    return 2 * n / statistics.median(times)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(model_dir: Path, device: str, batch: int, new_tokens: int) -> tuple[int, float]:
    """`batch` concurrent greedy answers through the embedded engine: tokens and seconds."""
    from tuneloop.core.records import Message, SamplingParams
    from tuneloop.serve.engine import EmbeddedEngine

    engine = EmbeddedEngine(model_dir, "bench", device=device, max_concurrency=batch)
    params = SamplingParams(new_tokens, 0.0, 1.0)
    counts = [0] * batch

    def answer(i: int) -> None:
        generation = engine.stream([Message("user", PROMPTS[i % len(PROMPTS)])], params)
        for _ in generation:
            pass
        counts[i] = generation.completion_tokens

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(batch)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    engine.close()
    return sum(counts), seconds


def dpo_rate(prepared: Path, model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """tuneloop's DPO job for `--dpo-steps` steps; the metrics of the version's manifest."""
    from tuneloop.core.job_spec import JobSpec
    from tuneloop.core.settings import JobSettings
    from tuneloop.train.run import train_version

    spec = JobSpec(
        kind="dpo",
        datasets=prepared / "datasets",
        base=model_dir,
        out=work / "dpo",
        version_id="bench-dpo",
        settings=JobSettings(
            overrides={
                "max_steps": args.dpo_steps,
                "max_length": args.max_length,
                "per_device_train_batch_size": args.dpo_batch,
            }
        ),
    )
    train_version(spec)
    return json.loads((spec.out / "manifest.json").read_text())["metrics"]


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(args.prepared, args.size, work / "model")
        weight_bytes = params * (2 if device.startswith("cuda") else 4)
        bandwidth = copy_bandwidth(device)
        limit = bandwidth / weight_bytes
        print(f"device: {device} ({name}), torch {torch.__version__}")
        print(
            f"model: {args.size}, {params / 1e9:.3f} B parameters, "
            f"{weight_bytes / 1e9:.2f} GB of weights read per decode step"
        )
        print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s -> at most {limit:,.0f} steps/s")
        for batch in args.batches:
            tokens, seconds = decode_rate(work / "model", device, batch, args.new_tokens)
            steps = tokens / batch / seconds
            print(
                f"decode, {batch} concurrent: {tokens} tokens in {seconds:.2f} s = "
                f"{tokens / seconds:,.0f} tok/s; {steps:,.0f} steps/s = {steps / limit:.1%} "
                "of the bandwidth limit"
            )
        if not args.dpo_steps:
            return 0
        dpo = dpo_rate(args.prepared, work / "model", work, args)
        runtime, tokens = dpo["train_runtime_s"], dpo["train_tokens"]
        rate = f"{tokens / runtime:,.0f} tok/s" if tokens and runtime else "no token count"
        print(
            f"DPO: {dpo['steps']} steps of {args.dpo_batch} pairs in {runtime:.1f} s "
            f"({dpo['steps'] / runtime:.2f} steps/s), {tokens} tokens: {rate}; "
            f"loss {dpo['train_loss']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="here: tokenizer and DPO datasets into DIR")
    p.add_argument("out", type=Path)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    r = sub.add_parser("run", help="on the GPU machine: model, bandwidth, decode, DPO")
    r.add_argument("prepared", type=Path)
    r.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    r.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    r.add_argument("--new-tokens", type=int, default=256)
    r.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    r.add_argument("--dpo-steps", type=int, default=30, help="0: no DPO")
    r.add_argument("--dpo-batch", type=int, default=8)
    r.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out, args.pairs, args.vocab)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
