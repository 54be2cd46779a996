"""Training jobs run as processes of their own: a crash, an out-of-memory kill or a NaN in one
never touches the process that serves. Each job reports through a status file
(`tuneloop.train.run` writes it); `run_job` follows that file into the job's training-run row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.core.settings import LaunchSettings
from tuneloop.feedback.runs import finish_run, update_run
from tuneloop.feedback.store import FeedbackStore

POLL_S = 0.5
# How much of a job's log a failed run row quotes when the status file says nothing.
LOG_TAIL_CHARS = 600


class JobFailed(RuntimeError):
    """A job process ended without success; the message is the error its run row shows."""


@dataclass(frozen=True)
class JobProcess:
    """What to run, and where its status and log go."""

    argv: list[str]
    status_file: Path
    log_file: Path


def job_command(
    module: str,
    spec_file: Path,
    python: str | None = None,
    launch: LaunchSettings | None = None,
) -> list[str]:
    """`python -m tuneloop.train.<module> SPEC.json`, with this interpreter by default; with the
    accelerate launcher, the same module under `accelerate launch` (torchrun starts its
    processes, each with `-m tuneloop.train.<module> SPEC.json`)."""
    job = ["-m", f"tuneloop.train.{module}", str(spec_file)]
    python = python or sys.executable
    if launch is None or launch.launcher == "local":
        return [python, *job]
    accelerate = [python, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config is not None:
        accelerate += ["--config_file", str(launch.accelerate_config)]
    if launch.num_processes is not None:
        accelerate += ["--num_processes", str(launch.num_processes)]
    return [*accelerate, *job]


def read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_job(
    store: FeedbackStore,
    run_id: str,
    job: JobProcess,
    *,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run `job` to its end, mirroring its status file's progress and stage into run `run_id`;
    returns the final status. Raises JobFailed (the run row is then failed
    with the same message) if the process fails, or is stopped through `stop`."""
    job.log_file.parent.mkdir(parents=True, exist_ok=True)
    job.status_file.unlink(missing_ok=True)
    last: tuple[float, str | None] = (-1.0, None)
    with job.log_file.open("ab") as log:
        proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if stop is not None and stop.wait(POLL_S):
                    proc.terminate()
                    proc.wait(30)
                    raise JobFailed("stopped by the operator")
                if stop is None:
                    time.sleep(POLL_S)
                status = read_status(job.status_file)
                now = (float(status.get("progress") or 0.0), status.get("stage"))
                if now != last:
                    last = now
                    update_run(store, run_id, progress=now[0], stage=now[1])
        except BaseException as exc:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            message = str(exc) if isinstance(exc, JobFailed) else f"interrupted: {exc!r}"
            finish_run(store, run_id, error=message)
            raise
    status = read_status(job.status_file)
    if proc.returncode != 0 or status.get("state") != "done":
        message = status.get("error") or _log_tail(job.log_file, proc.returncode)
        finish_run(store, run_id, error=message)
        raise JobFailed(message)
    return status


def _log_tail(log_file: Path, returncode: int | None) -> str:
    tail = log_file.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip()
    last = tail.splitlines()[-1] if tail else "no output"
    return f"the job process exited with code {returncode}: {last} (log: {log_file})"
