"""A real tuneloop server on 127.0.0.1 (a free port), run in a thread of the test process."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuneloop.core.config import DataDir, ServeConfig
from tuneloop.serve.server import run_server


@dataclass(frozen=True)
class LiveServer:
    url: str
    data_dir: DataDir
    model_dir: Path | None


def _local_only(spec: str) -> str:
    """Tests pass a checkpoint dir or promote a policy: no model is fetched or built here."""
    assert Path(spec).is_dir(), f"tests serve local checkpoints, not {spec!r}"
    return spec


def live_server(data_root: Path, model_dir: Path | None, **config: object) -> Iterator[LiveServer]:
    """Generator for a fixture: yields once the server listens, stops it afterwards. Without
    `model_dir` it serves the policy promoted in the data dir's registry.

    The test process may open the same DuckDB file with `duckdb.connect(path)`: within one
    process DuckDB shares the database instance, so the server's lock does not apply.
    """
    cfg = ServeConfig(
        DataDir(data_root), model=str(model_dir) if model_dir else None, port=0, **config
    )
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_server(cfg, _local_only, ready.put, stop)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)
            ready.put("")

    thread = threading.Thread(target=run, daemon=True, name="live-server")
    thread.start()
    url = ready.get(timeout=120)
    if errors:
        raise errors[0]
    try:
        yield LiveServer(url, cfg.data_dir, model_dir)
    finally:
        stop.set()
        thread.join(timeout=30)
