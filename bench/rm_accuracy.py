"""Benchmark: a reward model on real human preferences, through the CLI as an operator runs it.

1. The HH-RLHF harmless pairs (`../shared/data/hh-rlhf-harmless/pairs.jsonl.gz`, 1,800) are cut
   in two: the first `--train-pairs` are imported, the last `--unseen` never are.
2. `tuneloop data import FILE --model M` into a fresh data dir, `tuneloop train rm --model M --set
   num_train_epochs=1 [--set ...]` (the job holds out its own split of the imported pairs, by
   prompt hash, and reports its accuracy there), then `tuneloop eval rm --data UNSEEN --json`.
3. Reported: each command's wall seconds, the trainer's own runtime, the job's held-out accuracy
   and the accuracy on the unseen pairs (with a 95 % Wilson interval), and the epoch's training
   speed as a fraction of the fp32 matmul peak measured before and after the run in this process
   (`train_speed.matmul_peak`; bf16 too when `--set bf16=true`).

FLOP of the epoch: the useful work of `train_speed.Shape` (forward, and a backward with a frozen
base plus LoRA's weight gradients) over the real tokens of every pair the trainer kept: both
sides of each pair, as the chat template renders prompt and answer, pairs with a side over
`max_length` left out as TRL leaves them out. Padding counts for nothing.

    python bench/rm_accuracy.py [--train-pairs 1500] [--unseen 300] [--model smollm2]
        [--set KEY=VALUE ...] [--data-dir DIR] [--json FILE]
    python bench/rm_accuracy.py --report DATA_DIR --unseen-file FILE   # figures of a run made
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from train_speed import PAIRS_FILE, Shape, matmul_peak

from tuneloop.train.gate import wilson_interval

REWARD_MAX_LENGTH = 512  # tuneloop.train.reward_job.DEFAULTS


def split_pairs(root: Path, train_pairs: int, unseen: int) -> tuple[Path, Path]:
    with gzip.open(PAIRS_FILE, "rt") as f:
        lines = f.read().splitlines()
    if train_pairs + unseen > len(lines):
        raise SystemExit(f"{PAIRS_FILE} holds {len(lines)} pairs, not {train_pairs + unseen}")
    train, held = root / "train.jsonl", root / "unseen.jsonl"
    train.write_text("\n".join(lines[:train_pairs]) + "\n")
    held.write_text("\n".join(lines[-unseen:]) + "\n")
    return train, held


def tuneloop(*args: str) -> tuple[str, float]:
    """Run a `tuneloop` command; its stdout and wall seconds (stderr passes through)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args], stdout=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"tuneloop {' '.join(args)} failed ({proc.returncode})")
    return proc.stdout, time.perf_counter() - started


def epoch_flop(data_dir: Path, version_dir: Path) -> dict[str, Any]:
    """Useful FLOP of one epoch over the pairs the trainer kept (see the module doc)."""
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    manifest = json.loads((version_dir / "manifest.json").read_text())
    snapshot = data_dir / "snapshots" / manifest["snapshot_id"] / "datasets"
    rows = pq.read_table(snapshot / "preference.train.parquet").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(version_dir)
    max_length = manifest["config"].get("max_length") or REWARD_MAX_LENGTH

    def length(row: dict[str, Any], side: str) -> int:
        chat = [*row["prompt"], *row[side]]
        return len(tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"])

    kept = []
    for row in rows:
        sides = (length(row, "chosen"), length(row, "rejected"))
        if max(sides) <= max_length:
            kept.extend(sides)
    shape = Shape.of(AutoConfig.from_pretrained(version_dir), head_rows=1)
    lora = manifest.get("lora") or {}
    shape.p_lora = lora_weights(AutoConfig.from_pretrained(version_dir), lora)
    flop = sum(shape.forward(s, 1) + shape.backward(s, 1) for s in kept)
    return {
        "pairs_kept": len(kept) // 2,
        "pairs_offered": len(rows),
        "pairs_trained_per_manifest": manifest["data"]["preference"]["train"],
        "real_tokens": sum(kept),
        "flop": flop,
    }


def lora_weights(config: Any, lora: dict[str, Any]) -> int:
    """LoRA A and B weights of the job's adapter (`lora`, as the manifest records it), counted
    by PEFT itself on a weightless copy of the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not lora:
        return 0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = LoraConfig(r=lora["r"], target_modules=lora["target_modules"])
    peft = get_peft_model(model, adapter)
    return sum(p.numel() for n, p in peft.named_parameters() if ".lora_" in n)


def report(
    data_dir: Path,
    unseen: Path,
    seconds: dict[str, float],
    peaks: dict[str, float],
    evaluated: str | None = None,
) -> dict[str, Any]:
    if evaluated is None:
        evaluated, seconds["eval"] = tuneloop(
            "eval", "rm", "--data-dir", str(data_dir), "--data", str(unseen), "--json"
        )
    accuracy = json.loads(evaluated.strip().splitlines()[-1])
    version_dir = data_dir / "models" / "reward-v1"
    manifest = json.loads((version_dir / "manifest.json").read_text())
    metrics = manifest["metrics"]
    work = epoch_flop(data_dir, version_dir)
    runtime = metrics["train_runtime_s"]
    gflops = work["flop"] / runtime / 1e9
    peak = max(v for k, v in peaks.items() if k.startswith("fp32"))
    n = accuracy["pairs"]
    out = {
        "unseen_accuracy": accuracy,
        "unseen_ci95": [round(x, 3) for x in wilson_interval(accuracy["accuracy"] * n, n)],
        "heldout_accuracy": metrics.get("heldout_accuracy"),
        "heldout_pairs": metrics.get("heldout_pairs"),
        "steps": metrics["steps"],
        "train_runtime_s": runtime,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "settings": manifest.get("settings"),
        "config": {
            k: manifest["config"].get(k)
            for k in (
                "learning_rate",
                "per_device_train_batch_size",
                "max_length",
                "bf16",
                "num_train_epochs",
            )
        },
        **work,
        "gflop_per_s": round(gflops, 1),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "fraction_of_fp32_peak": round(gflops / peak, 3),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-pairs", type=int, default=1500)
    parser.add_argument("--unseen", type=int, default=300)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary dir")
    parser.add_argument("--report", type=Path, metavar="DATA_DIR", help="only report on a run made")
    parser.add_argument("--unseen-file", type=Path, help="with --report: its unseen pairs")
    parser.add_argument(
        "--eval-output", type=Path, help="with --report: `tuneloop eval rm --json`'s output"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bf16 = any(s.replace(" ", "") == "bf16=true" for s in args.set)
    peaks = {"fp32_before": matmul_peak("float32")}
    if bf16:
        peaks["bf16_before"] = matmul_peak("bfloat16")
    seconds: dict[str, float] = {}
    if args.report:
        data_dir, unseen = args.report, args.unseen_file
        if unseen is None:
            raise SystemExit("--report needs --unseen-file")
    else:
        data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="rm-accuracy-")) / "data"
        train, unseen = split_pairs(data_dir.parent, args.train_pairs, args.unseen)
        _, seconds["import"] = tuneloop(
            "data", "import", str(train), "--data-dir", str(data_dir), "--model", args.model
        )
        sets = [x for s in ["num_train_epochs=1", *args.set] for x in ("--set", s)]
        _, seconds["train"] = tuneloop(
            "train", "rm", "--data-dir", str(data_dir), "--model", args.model, *sets
        )
    peaks["fp32_after"] = matmul_peak("float32")
    if bf16:
        peaks["bf16_after"] = matmul_peak("bfloat16")
    evaluated = args.eval_output.read_text() if args.report and args.eval_output else None
    out = report(data_dir, unseen, seconds, peaks, evaluated)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
