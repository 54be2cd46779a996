"""Benchmark: training overhead of tuneloop's DPO and reward-model jobs against a bare TRL script on
the same data and model, in one run.

Data: the first `--pairs` real human preference pairs of `../shared/data/hh-rlhf-harmless/
pairs.jsonl.gz` (beside the repo; the benchmark exits with a message when it is absent), imported
the way the product imports them: `import_preferences` into a fresh `FeedbackStore`,
`create_snapshot`, `build_datasets`. Both sides train on that one `preference.train.parquet`.
Model: a tiny random Llama of the demo model's shape (`build_tiny_model`, hidden size 96, 4
layers, vocabulary 4096), or `--model DIR`.

- tuneloop: `python -m tuneloop.train.run SPEC.json` (a `JobSpec` of kind dpo or rm with the
  overrides max_steps=N and max_length=L) as a process of its own, the product's path (data order,
  LoRA, reference model, status-file callback with its NaN check, CPU thread picker, held-out
  evaluation, save, manifest). Steps/s = the manifest's `steps` / `train_runtime_s`
  (`trainer.train()`'s own runtime), so start-up, imports, data loading, evaluation and saving are
  left out. - bare TRL: what a TRL user writes by hand, also a process of its own (this file with
  `--bare-child`): `Dataset.from_parquet`, the model and tokenizer with `from_pretrained`,
  `DPOTrainer`/`RewardTrainer` with a `LoraConfig` and the TRL config, `trainer.train()`,
  `trainer.save_model()`. Steps/s = `global_step` / `TrainOutput.metrics["train_runtime"]`. The TRL
  config gets every value tuneloop's job used that differs from the TRL config class's default (read
  from the first tuneloop run's manifest: batch size, learning rate, max_steps, max_length, seed,
  logging, scheduler, bf16 and activation checkpointing off, ...), and the LoRA config tuneloop
  saved (r, alpha, dropout, targets, modules to save); the list is printed. `--bare-config minimal`
  passes only batch size, learning rate, max_steps, max_length, seed, use_cpu (and DPO's beta),
  leaving TRL's own defaults for the rest (on a CPU: bf16 autocast and activation checkpointing on):
  what a first script would run, not a like-for-like comparison.

The sides alternate (tuneloop, bare, bare, tuneloop, ...), `--repeats` rounds per job, so that
each pair runs back to back and the machine's noise hits both. Printed per round: steps/s of each
side, their ratio, wall time of the whole process (start-up included), CPU seconds per second of
training (about the number of busy threads; tuneloop's from /proc, polled against its status
file), and TRL's `num_tokens` per step (tokens without padding: both sides see the same amount of
text, though in different orders). The ratio judged against the goal is the median of the pairs'
ratios.

Threads: by default both processes start with torch's default thread count (one per core), and
tuneloop's job then picks its own (`ThreadPicker`: one thread or one per core, by timing steps;
under load from elsewhere one thread is often faster). `--torch-threads N` pins both sides to N
threads (OMP_NUM_THREADS and `torch.set_num_threads`); the tuneloop job then runs through
`tuneloop.train.run.main` with its thread picker replaced by a no-op, so that the comparison
measures the rest of the job's code.

Goal: tuneloop steps/s >= 0.9 x bare TRL steps/s, for each job.

    python bench/training_overhead.py [--jobs dpo rm] [--pairs 256] [--max-steps 40]
        [--max-length 128] [--repeats 3] [--torch-threads N] [--bare-config same|minimal]
        [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PAIRS_FILE, cpu_seconds, preference_datasets

from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JobSettings

GOAL_RATIO = 0.9
CONFIG_CLASSES = {"dpo": "DPOConfig", "rm": "RewardConfig"}
# Deprecated aliases in the config's dict (their new names are passed instead), and fields that
# are scratch paths or masked secrets.
SKIPPED_CONFIG_KEYS = {
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "output_dir",
    "logging_dir",
    "hub_token",
    "pad_token",
}
MINIMAL_CONFIG_KEYS = (
    "per_device_train_batch_size",
    "learning_rate",
    "max_steps",
    "max_length",
    "seed",
    "use_cpu",
    "beta",
)
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "modules_to_save")

# The tuneloop job with its thread picker replaced by a no-op and torch pinned to argv[1] threads.
TUNELOOP_FIXED_THREADS = """\
import sys
import torch
from transformers import TrainerCallback
import tuneloop.train.job_callbacks as callbacks
class NoPicker(TrainerCallback):
    def __init__(self, cores):
        pass
callbacks.ThreadPicker = NoPicker
torch.set_num_threads(int(sys.argv[1]))
from tuneloop.train.run import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass(frozen=True)
class Run:
    """One training process: steps and `trainer.train()` seconds as the process reported them,
    the process's wall time (start-up included) and its CPU seconds during training."""

    side: str  # "tuneloop" | "bare"
    steps: int
    train_s: float
    wall_s: float
    train_cpu_s: float | None
    tokens: int | None  # TRL's `num_tokens` at the end of training (tokens without padding)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.train_s

    @property
    def tokens_per_step(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.steps

    @property
    def busy_threads(self) -> float | None:
        return None if self.train_cpu_s is None else self.train_cpu_s / self.train_s


# --- Data and model -------------------------------------------------------------------------------


def length_profile(model: Path, train_file: Path, max_length: int) -> str:
    """How many training pairs `max_length` truncates (DPO) or filters out (reward model)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = pq.read_table(train_file).to_pylist()

    def tokens(messages: list[dict[str, str]], prompt: bool = False) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)["input_ids"]
        return len(ids)

    prompt_full = longer = 0
    for row in rows:
        full = max(tokens(row["prompt"] + row[side]) for side in ("chosen", "rejected"))
        longer += full > max_length
        prompt_full += tokens(row["prompt"], prompt=True) >= max_length
    return (
        f"{len(rows)} train pairs; longer than max_length {max_length}: {longer} (the reward "
        f"trainer drops them, DPO truncates them); prompt alone fills it: {prompt_full} "
        f"(DPO drops them)"
    )


# --- The two sides --------------------------------------------------------------------------------


def run_tuneloop(
    job: str, datasets: Path, model: Path, out: Path, args: argparse.Namespace
) -> tuple[Run, dict[str, Any]]:
    """The job as the product runs it; returns the run and the version's manifest."""
    status = out.with_name(out.name + ".status.json")
    spec = JobSpec(
        job,
        datasets,
        model,
        out,
        out.name,
        status=status,
        settings=JobSettings(
            overrides={"max_steps": args.max_steps, "max_length": args.max_length},
            seed=args.seed,
        ),
    )
    job_args = [str(spec.write(out.with_name(out.name + ".spec.json")))]
    if args.torch_threads:
        cmd = [sys.executable, "-c", TUNELOOP_FIXED_THREADS, str(args.torch_threads), *job_args]
    else:
        cmd = [sys.executable, "-m", "tuneloop.train.run", *job_args]
    wall, train_cpu, last = run_process(cmd, out.with_name(out.name + ".log"), args, status)
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["metrics"]
    tokens = (last or {}).get("metrics", {}).get("num_tokens")
    tokens = None if tokens is None else int(tokens)
    run = Run("tuneloop", metrics["steps"], metrics["train_runtime_s"], wall, train_cpu, tokens)
    return run, manifest


def bare_settings(
    job: str, manifest: dict[str, Any], mode: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The TRL config values and LoRA settings for the bare script, from tuneloop's manifest:
    every config value that differs from the TRL config class's default ("same"), or only the
    basic ones ("minimal")."""
    from dataclasses import fields

    import trl

    used = manifest["config"]
    if mode == "minimal":
        config = {k: used[k] for k in MINIMAL_CONFIG_KEYS if k in used}
    else:
        cls = getattr(trl, CONFIG_CLASSES[job])
        names = {f.name for f in fields(cls) if f.init} - SKIPPED_CONFIG_KEYS
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL's own defaults use deprecated aliases
            defaults = cls(output_dir=scratch, use_cpu=used["use_cpu"]).to_dict()
        config = {k: v for k, v in used.items() if k in names and defaults.get(k) != v}
        config["use_cpu"] = used["use_cpu"]
    lora = {k: manifest["lora"][k] for k in LORA_KEYS if manifest["lora"].get(k) is not None}
    return config, lora


def run_bare(
    job: str,
    train_file: Path,
    model: Path,
    out: Path,
    settings: tuple[dict[str, Any], dict[str, Any]],
    args: argparse.Namespace,
) -> Run:
    out.mkdir(parents=True)
    spec = {
        "job": job,
        "train_file": str(train_file),
        "model": str(model),
        "out": str(out),
        "config": settings[0],
        "lora": settings[1],
        "threads": args.torch_threads,
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-child", str(out / "spec.json")]
    wall, _, _ = run_process(cmd, out / "log.txt", args, None)
    r = json.loads((out / "result.json").read_text())
    return Run("bare", r["steps"], r["train_runtime"], wall, r["train_cpu_s"], r["tokens"])


def bare_child(spec_file: Path) -> int:
    """The bare TRL script: no tuneloop code from here on."""
    spec = json.loads(Path(spec_file).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    out = Path(spec["out"])
    train = Dataset.from_parquet(spec["train_file"], cache_dir=str(out / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if spec["job"] == "dpo":
        model = AutoModelForCausalLM.from_pretrained(spec["model"])
        config_cls, trainer_cls = DPOConfig, DPOTrainer
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        config_cls, trainer_cls = RewardConfig, RewardTrainer
    trainer = trainer_cls(
        model=model,
        args=config_cls(output_dir=str(out / "trainer"), **spec["config"]),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(**spec["lora"]),
    )
    cpu = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - cpu
    trainer.save_model()
    steps, runtime = trainer.state.global_step, result.metrics["train_runtime"]
    tokens = int(max(log.get("num_tokens", 0) for log in trainer.state.log_history))
    doc = {"steps": steps, "train_runtime": runtime, "train_cpu_s": cpu, "tokens": tokens}
    (out / "result.json").write_text(json.dumps(doc))
    return 0


def run_process(
    cmd: list[str], log: Path, args: argparse.Namespace, status: Path | None
) -> tuple[float, float | None, dict[str, Any] | None]:
    """Run `cmd` to the end; returns its wall seconds and, given the job's status file, the CPU
    seconds it used from the status file's first `total_steps` to the logged `train_runtime`
    (polled every 0.1 s) and the status at that point."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        cpu_start = cpu_end = last = None
        while proc.poll() is None:
            if status is not None and cpu_end is None:
                doc = read_status(status)
                cpu = cpu_seconds(proc.pid) if doc else None
                if doc and cpu_start is None and doc.get("total_steps"):
                    cpu_start = cpu
                if doc and cpu_start is not None and "train_runtime" in doc.get("metrics", {}):
                    cpu_end, last = cpu, doc
            time.sleep(0.1)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{tail}")
    if cpu_start is None or cpu_end is None:
        return wall, None, last
    return wall, cpu_end - cpu_start, last


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- Report ---------------------------------------------------------------------------------------


def report(job: str, pairs: list[tuple[Run, Run]]) -> dict[str, Any]:
    """Print one job's rounds and totals; returns its summary row."""
    print(f"\n{job}: rounds (order alternates: tuneloop first in odd rounds)")
    print(
        f"  {'round':<7}{'tuneloop st/s':>14}{'bare st/s':>11}{'ratio':>8}"
        f"{'tl wall s':>11}{'bare wall s':>13}{'tl threads':>12}{'bare threads':>14}"
        f"{'tl tok/step':>13}{'bare tok/step':>15}"
    )
    ratios = []
    for i, (t, b) in enumerate(pairs):
        ratios.append(t.steps_per_s / b.steps_per_s)
        print(
            f"  {i + 1:<7}{t.steps_per_s:>14.3f}{b.steps_per_s:>11.3f}{ratios[-1]:>8.3f}"
            f"{t.wall_s:>11.1f}{b.wall_s:>13.1f}{fmt(t.busy_threads):>12}{fmt(b.busy_threads):>14}"
            f"{fmt(t.tokens_per_step, 0):>13}{fmt(b.tokens_per_step, 0):>15}"
        )
    tl = [t for t, _ in pairs]
    bare = [b for _, b in pairs]
    row = {
        "job": job,
        "tuneloop": statistics.median(r.steps_per_s for r in tl),
        "bare": statistics.median(r.steps_per_s for r in bare),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "tl_wall": statistics.median(r.wall_s for r in tl),
        "bare_wall": statistics.median(r.wall_s for r in bare),
        "tl_threads": median_or_none([r.busy_threads for r in tl]),
        "bare_threads": median_or_none([r.busy_threads for r in bare]),
        "tl_tokens": median_or_none([r.tokens_per_step for r in tl]),
        "bare_tokens": median_or_none([r.tokens_per_step for r in bare]),
    }
    totals = [sum(r.steps for r in rs) / sum(r.train_s for r in rs) for rs in (tl, bare)]
    print(
        f"  totals: tuneloop {totals[0]:.3f} steps/s, bare {totals[1]:.3f} steps/s, ratio "
        f"{totals[0] / totals[1]:.3f} (totals), {row['ratio']:.3f} (median of pairs)"
    )
    return row


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    threads = f"pinned {args.torch_threads}" if args.torch_threads else "default (picker)"
    print(f"\nsummary (threads: {threads}; bare config: {args.bare_config}; steps/s, wall")
    print("(process start to exit), threads, tokens: medians of runs; ratio: median of pairs)")
    print(
        "| job | tuneloop steps/s | bare TRL steps/s | tuneloop/bare (min-max) | tuneloop wall s "
        "| bare wall s | busy threads tuneloop / bare | tokens/step tuneloop / bare |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['job']} | {r['tuneloop']:.3f} | {r['bare']:.3f} "
            f"| **{r['ratio']:.3f}** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
            f"| {r['tl_wall']:.1f} | {r['bare_wall']:.1f} "
            f"| {fmt(r['tl_threads'])} / {fmt(r['bare_threads'])} "
            f"| {fmt(r['tl_tokens'], 0)} / {fmt(r['bare_tokens'], 0)} |"
        )
    met = all(r["ratio"] >= GOAL_RATIO for r in rows)
    detail = ", ".join(f"{r['job']}: {r['ratio']:.3f}" for r in rows)
    verdict = "met" if met else "MISSED"
    print(f"goal: tuneloop steps/s >= {GOAL_RATIO} x bare TRL: {verdict} ({detail})")
    return met


# --- Main -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> int:
    built = preference_datasets(tmp, args.pairs)
    datasets, train_rows, heldout_rows = built.train.parent, built.train_rows, built.heldout_rows
    model = args.model
    if model is None:
        from tuneloop.train.tiny_model import build_tiny_model

        model = build_tiny_model(tmp / "model", hidden_size=96, num_layers=4, vocab_size=4096)
    train_file = datasets / "preference.train.parquet"
    print(f"preference split: {train_rows} train / {heldout_rows} held-out rows")
    print(length_profile(model, train_file, args.max_length))
    print(
        f"model: {args.model or 'tiny Llama, hidden 96 x 4 layers, vocab 4096'}  "
        f"max_steps: {args.max_steps}  max_length: {args.max_length}  repeats: {args.repeats}  "
        f"cpus: {os.cpu_count()}  torch threads: {args.torch_threads or 'default'}  "
        f"load avg: {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for job in args.jobs:
        pairs: list[tuple[Run, Run]] = []
        settings = None
        for i in range(args.repeats):
            order = ("tuneloop", "bare") if i % 2 == 0 else ("bare", "tuneloop")
            done: dict[str, Run] = {}
            for side in order:
                if side == "tuneloop":
                    out = tmp / "versions" / f"{job}-{i}"
                    done[side], manifest = run_tuneloop(job, datasets, model, out, args)
                    if settings is None:
                        settings = bare_settings(job, manifest, args.bare_config)
                        print(f"\n{job}: bare TRL config: {json.dumps(settings[0])}")
                        print(f"{job}: bare LoRA config: {json.dumps(settings[1])}")
                else:
                    assert settings is not None
                    out = tmp / "bare" / f"{job}-{i}"
                    done[side] = run_bare(job, train_file, model, out, settings, args)
                r = done[side]
                print(
                    f"  {job} round {i + 1} {side}: {r.steps} steps in {r.train_s:.1f} s, "
                    f"{r.tokens} tokens, wall {r.wall_s:.1f} s  "
                    f"(load avg {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
            pairs.append((done["tuneloop"], done["bare"]))
        rows.append(report(job, pairs))
    summary(rows, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=("dpo", "rm"), default=["dpo", "rm"])
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs to import")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps, both sides")
    parser.add_argument("--max-length", type=int, default=128, help="max_length, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per job (pairs of runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="pin both sides to N intra-op threads (tuneloop's thread picker replaced by a "
        "no-op); default: torch's default, and tuneloop's picker",
    )
    parser.add_argument(
        "--bare-config",
        choices=("same", "minimal"),
        default="same",
        help="bare TRL config: every value tuneloop set (default), or only the basic ones",
    )
    parser.add_argument("--model", type=Path, help="model dir (default: a tiny random Llama)")
    parser.add_argument("--bare-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_child:
        return bare_child(args.bare_child)
    if not PAIRS_FILE.exists():
        print(f"skipped: {PAIRS_FILE} not found (real preference pairs beside the repo)")
        return 0
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
