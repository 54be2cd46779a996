"""Benchmark: how much the loop learns from the feedback people really give, side by side.

Every arm is one `tuneloop simulate --traffic N` run (simulated users chatting and reacting to a
share of answers, raters judging tasks from the queue, one training cycle), on a fresh data dir,
with the hidden preference judging the win rate on held-out questions. The arms, each over
`--seeds` seeds (mean and spread of the win rate, how many runs were promoted):

- `selection`: rater judgments asked `random`ly against `active`ly (the most informative to the
  reward model first), active with half the judgments of random, at each of `--budgets`; users
  react to `--selection-user-feedback` of the answers (default 0: the judgments alone teach, as
  users' reactions alone already teach the built-in preferences);
- `raters`: honest raters against `--bad-raters` of them random or inverted, with trust weights
  and without (`--no-rater-weights`), with the shares of bad and honest raters caught;
- `reactions`: users' reactions alone (`--judgments 0`) against reactions and raters.

    python bench/feedback_efficiency.py [--arms selection,raters,reactions] [--seeds 3]
        [--model demo] [--traffic 1000] [--judgments 150] [--budgets 100,200]
        [--selection-user-feedback 0] [--json FILE]

Each run's summary is the simulate's own last line, kept whole in `--json`. An arm with the same
flags as one already run (reactions and judgments, honest raters weighted) reuses its runs. The
runs are serial (each uses both cores); a SmolLM2 run takes most of an hour, a toy one about five
minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def simulate(model: str, seed: int, flags: list[str], root: Path) -> dict[str, Any]:
    """One `tuneloop simulate` run; its summary (the last line of its stdout)."""
    data = root / f"run-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "tuneloop.cli", "simulate", "--data-dir", str(data)]
    argv += ["--model", model, "--seed", str(seed), *flags]
    print("$ tuneloop " + " ".join(argv[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed ({proc.returncode}): {' '.join(argv)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def arms(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(arm, label, simulate flags) of every configuration asked for."""
    base = ["--traffic", str(args.traffic), "--raters", str(args.raters)]
    found = []
    if "selection" in args.arms:
        chosen = [*base, "--user-feedback", str(args.selection_user_feedback)]
        for budget in args.budgets:
            found.append(
                ("selection", f"random, {budget}", [*chosen, "--judgments", str(budget),
                                                    "--task-selection", "random"])
            )  # fmt: skip
            found.append(
                ("selection", f"active, {budget // 2}", [*chosen, "--judgments", str(budget // 2),
                                                          "--task-selection", "active"])
            )  # fmt: skip
    judged = [*base, "--judgments", str(args.judgments)]
    if "raters" in args.arms:
        bad = ["--bad-raters", str(args.bad_raters)]
        found += [
            ("raters", "honest, weighted", judged),
            ("raters", f"{args.bad_raters:.0%} bad, weighted", [*judged, *bad]),
            ("raters", f"{args.bad_raters:.0%} bad, unweighted",
             [*judged, *bad, "--no-rater-weights"]),
        ]  # fmt: skip
    if "reactions" in args.arms:
        found += [
            ("reactions", "reactions alone", [*base, "--judgments", "0"]),
            ("reactions", f"reactions and {args.judgments} judgments", judged),
        ]
    return found


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the platform's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    wins = [r["win_rate"] for r in runs]
    row: dict[str, Any] = {
        "win_rate_mean": statistics.fmean(wins),
        "win_rate_min": min(wins),
        "win_rate_max": max(wins),
        "promoted": sum(bool(r["promoted"]) for r in runs),
        "runs": len(runs),
        "judgments": statistics.fmean(r.get("judgments", 0) for r in runs),
        "minutes": statistics.fmean(r["seconds"] for r in runs) / 60,
    }
    for key in ("bad_raters_caught", "honest_raters_caught"):
        caught = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.fmean(caught) if caught else None
    return row


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    lines = [
        "| arm | runs as | win rate, mean [min, max] | promoted | judgments | bad caught | "
        "honest caught | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, label, s in rows:
        caught = [f"{s[k]:.0%}" if s[k] is not None else "—" for k in
                  ("bad_raters_caught", "honest_raters_caught")]  # fmt: skip
        lines.append(
            f"| {arm} | {label} | {s['win_rate_mean']:.3f} [{s['win_rate_min']:.3f}, "
            f"{s['win_rate_max']:.3f}] | {s['promoted']}/{s['runs']} | {s['judgments']:.0f} | "
            f"{caught[0]} | {caught[1]} | {s['minutes']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="selection,raters,reactions")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="demo")
    p.add_argument("--traffic", type=int, default=1000)
    p.add_argument("--raters", type=int, default=6)
    p.add_argument("--judgments", type=int, default=150)
    p.add_argument("--bad-raters", type=float, default=0.3)
    p.add_argument("--budgets", default="100,200", help="random's judgments; active gets half")
    p.add_argument("--selection-user-feedback", type=float, default=0.0)
    p.add_argument("--json", type=Path, help="write every run's summary here")
    args = p.parse_args()
    args.arms = set(args.arms.split(","))
    args.budgets = [int(b) for b in args.budgets.split(",") if b]
    results: list[tuple[str, str, dict[str, Any]]] = []
    every: dict[str, list[dict[str, Any]]] = {}
    done: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="feedback-efficiency-") as tmp:
        for arm, label, flags in arms(args):
            if tuple(flags) not in done:
                done[tuple(flags)] = [
                    simulate(args.model, seed, flags, Path(tmp)) for seed in range(args.seeds)
                ]
            runs = done[tuple(flags)]
            every[f"{arm}: {label}"] = runs
            results.append((arm, label, summarize(runs)))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"model {args.model}, traffic {args.traffic}, {args.raters} raters, seeds "
          f"0-{args.seeds - 1}, CPU {cpu_name()} ({os.cpu_count()} cores)")  # fmt: skip
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(every, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
