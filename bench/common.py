"""Helpers shared by the benchmarks: a `tuneloop up` server in a process of its own, CPU time of
a process, percentiles, and DPO datasets built from real preference pairs.

The server runs as a separate process (`python -m tuneloop.cli up --no-ui ...`) on a free port of
127.0.0.1 with a fresh data dir, so that the load generator never shares the server's GIL.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from tuneloop.feedback.datasets import DatasetFiles

HOST = "127.0.0.1"
PAIRS_FILE = (
    Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tiny_model(tmp: Path, hidden_size: int, num_layers: int) -> Path:
    """The streaming benchmarks' default model: a random tiny Llama in `tmp/model`."""
    from tuneloop.train.tiny_model import build_tiny_model

    return build_tiny_model(tmp / "model", hidden_size=hidden_size, num_layers=num_layers)


def preference_datasets(root: Path, pairs: int) -> DatasetFiles:
    """Import `pairs` pairs of `PAIRS_FILE` into a fresh store under `root`, snapshot it and
    build the datasets, as a training job's snapshot would; the preference datasets (`train`,
    `heldout` and their row counts)."""
    from tuneloop.feedback.datasets import build_datasets
    from tuneloop.feedback.importer import import_preferences
    from tuneloop.feedback.snapshot import create_snapshot
    from tuneloop.feedback.store import FeedbackStore

    with FeedbackStore(root / "feedback.duckdb") as store:
        imported = import_preferences(store, PAIRS_FILE, limit=pairs)
        snapshot = create_snapshot(store, root / "snapshots")
    print(f"imported {imported.pairs} pairs ({imported.skipped} skipped) from {PAIRS_FILE}")
    return build_datasets(snapshot.path)["preference"]


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout_s: float, log_tail: Callable[[], str] = str
) -> None:
    """Until `url/health` answers 200; an error with the end of the log if `proc` exits or
    `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no healthy server at {url} after {timeout_s:.0f} s:\n{log_tail()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values sorted ascending; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# The first admin's token of each data dir a benchmark started a server on (see `auth`).
_ADMIN_TOKENS: dict[Path, str] = {}


class ServerProcess:
    """`tuneloop up --no-ui` serving `model` from `data_dir` (which must be fresh) on a free port.

    Use as a context manager: entering starts the process and waits until `GET /health` answers
    200; leaving sends SIGINT (a clean shutdown that closes the store) and kills the process if it
    has not exited after `stop_timeout` seconds. The server's output goes to `data_dir/server.log`;
    `args` go to `tuneloop up` after the others; `env` adds variables to its environment.
    """

    def __init__(
        self,
        model: Path,
        data_dir: Path,
        *,
        max_concurrency: int = 8,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.model = model
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = data_dir / "server.log"
        self._max_concurrency = max_concurrency
        self._args = list(args)
        self._env = os.environ | (env or {})
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the server is not running"
        return self._proc.pid

    @property
    def auth(self) -> dict[str, str]:
        """Headers that sign in as the first admin. Its token is in the data dir until its first
        sign-in, which removes the file: it is read once per data dir, and kept."""
        key = self.data_dir.resolve()
        if key not in _ADMIN_TOKENS:
            _ADMIN_TOKENS[key] = (self.data_dir / "admin.token").read_text().strip()
        return {"Authorization": f"Bearer {_ADMIN_TOKENS[key]}"}

    def __enter__(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "up",
            "--no-ui",
            "--model",
            str(self.model),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--max-concurrency",
            str(self._max_concurrency),
            "--data-dir",
            str(self.data_dir),
            *self._args,
        ]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        wait_healthy(self.url, self._proc, self._start_timeout, self.log_tail)

    def stop(self) -> None:
        """SIGINT, then SIGKILL after `stop_timeout` seconds; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]
