"""Entry point of a training job, run as its own process:

    python -m tuneloop.train.run {rm,dpo,kto,sft,rl} --datasets DIR --base BASE_DIR
        [--parent VERSION_DIR] [--parent-id ID] --out VERSION_DIR --version-id ID
        [--snapshot-id S] [--status FILE] [--config FILE.yaml] [--set key=value ...] [--full]
        [--reward-model DIR] [--seed N]

Exit status 0 when the version dir is in place; 1 otherwise (SIGTERM included), with state
"failed" and a one-line reason in the status file (and on stderr). The version is built in
`<out>.tmp` and renamed to `<out>` only once complete, so a failed job leaves no `<out>`.

`run_job(kind, spec)` does the same in-process (tests, benchmarks) and raises on failure.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tuneloop.core.artifacts import write_manifest
from tuneloop.core.settings import JOBS
from tuneloop.train.job_common import (
    JobOutput,
    JobSpec,
    StatusFile,
    build_manifest,
    scratch_dir,
)
from tuneloop.train.job_config import JobError, parse_set


def run_job(kind: str, spec: JobSpec) -> Path:
    """Train, save and manifest one version into `spec.out`; returns `spec.out`.

    The status file (if any) ends "done" with progress 1.0, or "failed" with the error."""
    import torch

    from tuneloop.train.trl_cpu_head import score_labelled_positions_on_cpu

    score_labelled_positions_on_cpu()
    threads = torch.get_num_threads()  # jobs pick their own (`job_callbacks.ThreadPicker`)
    try:
        return _run_job(kind, spec)
    finally:
        torch.set_num_threads(threads)


def _run_job(kind: str, spec: JobSpec) -> Path:
    status = StatusFile(spec.status, kind, spec.version_id)
    work = spec.out.with_name(spec.out.name + ".tmp")
    try:
        if kind not in JOBS:
            raise JobError(f"unknown job {kind!r}: expected one of {', '.join(JOBS)}")
        if spec.out.exists():
            raise JobError(f"output version dir already exists: {spec.out}")
        shutil.rmtree(work, ignore_errors=True)  # left by a killed run of this version
        work.mkdir(parents=True)
        status.write("running")
        output = _job_function(kind)(spec, work, status)
        shutil.rmtree(scratch_dir(work), ignore_errors=True)
        write_manifest(work, build_manifest(kind, spec, output))
        work.rename(spec.out)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        status.write("failed", error=error_line(e))
        raise
    status.metrics = output.metrics
    status.step = status.total_steps = output.metrics.get("steps", status.step)
    status.write("done", progress=1.0)
    return spec.out


def error_line(error: BaseException) -> str:
    """One line for the operator: a `JobError`'s own message, else the exception type too."""
    text = " ".join(str(error).split())
    if isinstance(error, JobError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _job_function(kind: str) -> Callable[[JobSpec, Path, StatusFile], JobOutput]:
    """The job's function, imported on demand: the imports take seconds (torch, TRL)."""
    if kind == "rm":
        from tuneloop.train.reward_job import train_reward

        return train_reward
    if kind == "rl":
        from tuneloop.train.rl_job import train_rl

        return train_rl
    from tuneloop.train import policy_jobs

    return {
        "dpo": policy_jobs.train_dpo,
        "kto": policy_jobs.train_kto,
        "sft": policy_jobs.train_sft,
    }[kind]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuneloop.train.run",
        description="Train one model version from a snapshot's datasets.",
    )
    parser.add_argument("job", choices=JOBS, help="reward model, DPO, KTO, SFT or online RL")
    parser.add_argument(
        "--datasets", type=Path, required=True, help="dir of <name>.<split>.parquet"
    )
    parser.add_argument("--base", type=Path, required=True, help="root base model (full weights)")
    parser.add_argument("--parent", type=Path, help="version dir to start from (default: --base)")
    parser.add_argument("--parent-id", help="the parent's version id (default: its manifest's)")
    parser.add_argument("--out", type=Path, required=True, help="version dir to create")
    parser.add_argument("--version-id", required=True, help="id of the new version")
    parser.add_argument("--snapshot-id", help="the snapshot the datasets were built from")
    parser.add_argument("--status", type=Path, help="JSON status file, rewritten as the job runs")
    parser.add_argument("--config", type=Path, help="YAML or JSON file of TRL config settings")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TRL config setting, or lora.<field> (repeatable; wins over --config)",
    )
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--reward-model", type=Path, help="reward version dir (rl only)")
    parser.add_argument("--seed", type=int, default=0, help="data order and init (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A cancelled job (SIGTERM) cleans up and reports like a failed one.
    signal.signal(signal.SIGTERM, _cancel)
    status = StatusFile(args.status, args.job, args.version_id)
    try:
        spec = JobSpec(
            datasets=args.datasets,
            base=args.base,
            out=args.out,
            version_id=args.version_id,
            parent=args.parent,
            parent_id=args.parent_id,
            snapshot_id=args.snapshot_id,
            status=args.status,
            config_file=args.config,
            overrides=parse_set(args.overrides),
            full=args.full,
            reward_model=args.reward_model,
            seed=args.seed,
        )
    except JobError as e:
        status.write("failed", error=error_line(e))
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    try:
        run_job(args.job, spec)
    except Exception as e:
        if not isinstance(e, JobError):
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    print(spec.out)
    return 0


def _cancel(signum: int, frame: object) -> None:
    raise JobError("cancelled (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
