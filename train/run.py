"""Entry point of a training job, run as its own process:

    python -m tuneloop.train.run SPEC.json

`SPEC.json` is a `tuneloop.core.job_spec.JobSpec` (the loop writes it into the run's folder).
Exit status 0 when the version dir is in place; 1 otherwise (SIGTERM included), with state
"failed" and a one-line reason in the status file (and on stderr). The version is built in
`<out>.tmp` and renamed to `<out>` only once complete, so a failed job leaves no `<out>`.

`train_version(spec)` does the same in-process (tests, benchmarks) and raises on failure.

Under `accelerate launch` (`--launcher accelerate`) each of its processes runs this module; rank
0 alone writes the status file and the version dir (`tuneloop.train.processes`).
"""

from __future__ import annotations

import importlib
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tuneloop.core.artifacts import write_manifest
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JOB_KINDS, SettingsError
from tuneloop.train.job_common import (
    JobOutput,
    StatusFile,
    build_manifest,
    scratch_dir,
)
from tuneloop.train.job_config import JobError
from tuneloop.train.processes import JobProcesses, job_processes


def train_version(spec: JobSpec) -> Path:
    """Train, save and manifest one version into `spec.out`; returns `spec.out`.

    The status file (if any) ends "done" with progress 1.0, or "failed" with the error."""
    import torch

    from tuneloop.train.trl_cpu_head import score_labelled_positions_on_cpu

    score_labelled_positions_on_cpu()
    threads = torch.get_num_threads()  # jobs pick their own (`job_callbacks.ThreadPicker`)
    try:
        return _train_version(spec)
    finally:
        torch.set_num_threads(threads)


def _train_version(spec: JobSpec) -> Path:
    processes = job_processes()
    if not processes.main:
        return _train_on_other_rank(spec, processes)
    status = StatusFile(spec.status, spec.kind, spec.version_id)
    work = spec.out.with_name(spec.out.name + ".tmp")
    try:
        if spec.out.exists():
            raise JobError(f"output version dir already exists: {spec.out}")
        shutil.rmtree(work, ignore_errors=True)  # left by a killed run of this version
        work.mkdir(parents=True)
        status.write("running")
        output = _job_function(spec.kind)(spec, work, status)
        shutil.rmtree(scratch_dir(work), ignore_errors=True)
        write_manifest(work, build_manifest(spec.kind, spec, output, processes.world_size))
        work.rename(spec.out)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        status.write("failed", error=error_line(e))
        raise
    status.metrics = output.metrics
    status.step = status.total_steps = output.metrics.get("steps", status.step)
    status.write("done", progress=1.0)
    return spec.out


def _train_on_other_rank(spec: JobSpec, processes: JobProcesses) -> Path:
    """Rank 1 and up of a multi-process job: train beside rank 0, with no status file and a
    scratch dir of its own (its datasets cache and the trainer's output dir), removed after.
    The job functions save the version on rank 0 only."""
    work = spec.out.with_name(f"{spec.out.name}.rank{processes.rank}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _job_function(spec.kind)(spec, work, StatusFile(None, spec.kind, spec.version_id))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return spec.out


def error_line(error: BaseException) -> str:
    """One line for the operator: a `JobError`'s or `SettingsError`'s own message, else the
    exception type too."""
    text = " ".join(str(error).split())
    if isinstance(error, JobError | SettingsError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _job_function(kind: str) -> Callable[[JobSpec, Path, StatusFile], JobOutput]:
    """The job's function (`JobKind.trainer`), imported on demand: the imports take seconds
    (torch, TRL)."""
    module, _, name = JOB_KINDS[kind].trainer.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m tuneloop.train.run SPEC.json", file=sys.stderr)
        return 2
    # A cancelled job (SIGTERM) cleans up and reports like a failed one.
    signal.signal(signal.SIGTERM, _cancel)
    try:
        spec = JobSpec.read(Path(args[0]))
    except (OSError, SettingsError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    try:
        train_version(spec)
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
