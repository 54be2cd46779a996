"""Benchmark: a DPO job under `accelerate launch` through tuneloop (`--launcher accelerate`)
against the same TRL training launched by hand with `accelerate launch` and the same config,
side by side in one run.

- tuneloop: the command a cycle runs, `tuneloop.loop.job_runner.job_command("run", SPEC,
  launch=LaunchSettings("accelerate", CONFIG, N))`, i.e. `python -m accelerate.commands.launch
  --config_file CONFIG --num_processes N -m tuneloop.train.run SPEC.json`: the product's path
  (seeded data order, LoRA, the base as reference, status file on rank 0, threads split between
  the processes, held-out evaluation, save and manifest on rank 0).
- by hand: `python -m accelerate.commands.launch --config_file CONFIG --num_processes N
  bench/accelerate_launch.py --bare-child SPEC.json`, a plain TRL script (`DPOTrainer` with a
  `LoraConfig`, `trainer.train()`, `trainer.save_model()`) given every DPOConfig value tuneloop's
  job used that differs from TRL's default and the LoRA config it saved (read from the first
  tuneloop manifest, as `bench/training_overhead.py` does; the list is printed).

tuneloop's jobs also switch TRL's fused LM head to score only labelled positions on a CPU
(`tuneloop.train.trl_cpu_head`), which a plain TRL script does not: `--bare-cpu-head` gives the
by-hand script that switch too, so that both sides run the same computation and the ratio is the
cost of tuneloop's launch path and job code alone.

Tokens/s = TRL's `num_tokens` (tokens without padding, summed over the processes) / the
trainer's own `train_runtime` on rank 0, so start-up, imports, evaluation and saving are left
out on both sides. The sides alternate (tuneloop, bare, bare, tuneloop, ...); the ratio judged
is the median of the rounds' ratios.

Data: `--pairs` HH-RLHF harmless pairs (beside the repo, `../shared/data/`) imported, snapshot and
built as the product does. Model: a tiny random Llama (hidden 96 x 4 layers, vocab 4096).

Goal: tuneloop tokens/s >= 0.9 x by hand.

    python bench/accelerate_launch.py [--config examples/accelerate/cpu_ddp.yaml]
        [--num-processes 2] [--pairs 256] [--max-steps 40] [--batch 4] [--max-length 128]
        [--repeats 3] [--bare-cpu-head]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PAIRS_FILE, preference_datasets
from training_overhead import bare_settings

from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JobSettings, LaunchSettings
from tuneloop.loop.job_runner import job_command

GOAL_RATIO = 0.9
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    side: str
    steps: int
    train_s: float
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def launched(cmd: list[str], log: Path) -> float:
    """Run `cmd` to its end, output into `log`; its wall seconds. Exits on failure."""
    started = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{cmd} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - started


def run_tuneloop(
    datasets: Path, model: Path, out: Path, args: argparse.Namespace
) -> tuple[Run, dict[str, Any]]:
    launch = LaunchSettings("accelerate", args.config, args.num_processes)
    overrides = {
        "max_steps": args.max_steps,
        "max_length": args.max_length,
        "per_device_train_batch_size": args.batch,
    }
    spec = JobSpec(
        "dpo",
        datasets,
        model,
        out,
        out.name,
        status=out.with_name(out.name + ".status.json"),
        settings=JobSettings(overrides=overrides, seed=args.seed, launch=launch),
    )
    cmd = job_command("run", spec.write(out.with_name(out.name + ".spec.json")), launch=launch)
    wall = launched(cmd, out.with_name(out.name + ".log"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["launcher"], manifest["world_size"]) == ("accelerate", args.num_processes)
    m = manifest["metrics"]
    return Run("tuneloop", m["steps"], m["train_runtime_s"], m["train_tokens"], wall), manifest


def run_bare(
    train_file: Path,
    model: Path,
    out: Path,
    settings: tuple[dict[str, Any], dict[str, Any]],
    args: argparse.Namespace,
) -> Run:
    out.mkdir(parents=True)
    spec = {"train_file": str(train_file), "model": str(model), "out": str(out)}
    spec["cpu_head"] = args.bare_cpu_head
    spec |= {"config": settings[0], "lora": settings[1]}
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.config)]
    cmd += ["--num_processes", str(args.num_processes), str(Path(__file__).resolve())]
    cmd += ["--bare-child", str(out / "spec.json")]
    wall = launched(cmd, out / "log.txt")
    r = json.loads((out / "result.json").read_text())
    return Run("bare", r["steps"], r["train_runtime"], r["tokens"], wall)


def bare_child(spec_file: Path) -> int:
    """The TRL script a user launches with `accelerate launch`: no tuneloop code from here on,
    but for TRL's own switch of its LM head with `--bare-cpu-head`."""
    spec = json.loads(Path(spec_file).read_text())
    if spec["cpu_head"]:
        from tuneloop.train.trl_cpu_head import score_labelled_positions_on_cpu

        score_labelled_positions_on_cpu()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = Path(spec["out"])
    train = Dataset.from_parquet(spec["train_file"], cache_dir=str(out / "cache"))
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["model"]),
        args=DPOConfig(output_dir=str(out / "trainer"), **spec["config"]),
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        peft_config=LoraConfig(**spec["lora"]),
    )
    result = trainer.train()
    trainer.save_model()
    if trainer.accelerator.is_main_process:
        tokens = int(max(log.get("num_tokens", 0) for log in trainer.state.log_history))
        doc = {
            "steps": trainer.state.global_step,
            "train_runtime": result.metrics["train_runtime"],
            "tokens": tokens,
        }
        (out / "result.json").write_text(json.dumps(doc))
    return 0


def run(args: argparse.Namespace, tmp: Path) -> bool:
    from tuneloop.train.tiny_model import build_tiny_model

    built = preference_datasets(tmp, args.pairs)
    datasets, train_file = built.train.parent, built.train
    model = build_tiny_model(tmp / "model", hidden_size=96, num_layers=4, vocab_size=4096)
    print(
        f"{built.train_rows} train pairs; tiny Llama hidden 96 x 4 layers; {args.num_processes} "
        f"processes ({args.config.name}), batch {args.batch} per process, max_length "
        f"{args.max_length}, {args.max_steps} steps; by-hand LM head: "
        f"{'compact (--bare-cpu-head)' if args.bare_cpu_head else 'TRL default'}; cpus "
        f"{os.cpu_count()}; load avg "
        f"{os.getloadavg()[0]:.2f}"
    )
    settings = None
    ratios: list[float] = []
    runs: list[Run] = []
    for i in range(args.repeats):
        done: dict[str, Run] = {}
        for side in ("tuneloop", "bare") if i % 2 == 0 else ("bare", "tuneloop"):
            if side == "tuneloop":
                done[side], manifest = run_tuneloop(datasets, model, tmp / f"v-{i}", args)
                if settings is None:
                    settings = bare_settings("dpo", manifest, "same")
                    print(f"by-hand DPOConfig: {json.dumps(settings[0])}")
                    print(f"by-hand LoraConfig: {json.dumps(settings[1])}")
            else:
                assert settings is not None
                done[side] = run_bare(train_file, model, tmp / f"bare-{i}", settings, args)
            r = done[side]
            print(
                f"  round {i + 1} {side:>8}: {r.steps} steps, {r.tokens} tokens in "
                f"{r.train_s:.2f} s = {r.tokens_per_s:,.0f} tokens/s (wall {r.wall_s:.1f} s, "
                f"load avg {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        ratios.append(done["tuneloop"].tokens_per_s / done["bare"].tokens_per_s)
        runs += done.values()
    print("\n| side | tokens/s (median) | steps | tokens per run | wall s (median) |")
    print("|---|---|---|---|---|")
    for side in ("tuneloop", "bare"):
        mine = [r for r in runs if r.side == side]
        rate = statistics.median(r.tokens_per_s for r in mine)
        wall = statistics.median(r.wall_s for r in mine)
        print(f"| {side} | {rate:,.0f} | {mine[0].steps} | {mine[0].tokens} | {wall:.1f} |")
    ratio = statistics.median(ratios)
    met = ratio >= GOAL_RATIO
    shown = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"\ntuneloop / by hand, tokens/s: {ratio:.3f} (rounds: {shown})")
    print(f"goal: >= {GOAL_RATIO}: {'met' if met else 'MISSED'}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bare-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, default=REPO / "examples/accelerate/cpu_ddp.yaml")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bare-cpu-head",
        action="store_true",
        help="the by-hand script scores labelled positions only, as tuneloop's jobs do",
    )
    args = parser.parse_args(argv)
    if args.bare_child is not None:
        return bare_child(args.bare_child)
    if not PAIRS_FILE.exists():
        sys.exit(f"no preference pairs at {PAIRS_FILE}")
    args.config = args.config.resolve()
    with tempfile.TemporaryDirectory(prefix="accelerate-bench-") as tmp:
        return 0 if run(args, Path(tmp)) else 1


if __name__ == "__main__":
    sys.exit(main())
