"""A real tuneloop server on 127.0.0.1 (a free port), run in a thread of the test process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tuneloop.core.config import DataDir, ServeConfig
from tuneloop.core.settings import TaskSettings
from tuneloop.serve.server import server_in_thread


@dataclass(frozen=True)
class LiveServer:
    url: str
    data_dir: DataDir
    model_dir: Path | None

    @property
    def token(self) -> str:
        """The first admin's token, which the server wrote to the data dir on its first start."""
        return self.data_dir.admin_token_file.read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """Headers that sign in as the first admin."""
        return {"Authorization": f"Bearer {self.token}"}

    def account(self, name: str, role: str = "user") -> dict[str, str]:
        """Make an account through the API; headers that sign in as it."""
        made = httpx.post(
            f"{self.url}/v1/admin/users", json={"name": name, "role": role}, headers=self.auth
        )
        made.raise_for_status()
        return {"Authorization": f"Bearer {made.json()['token']}"}


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
    # No rating tasks made in the background: tests count the answers they asked for.
    config.setdefault("tasks", TaskSettings(backlog=0))
    cfg = ServeConfig(
        DataDir(data_root), model=str(model_dir) if model_dir else None, port=0, **config
    )
    with server_in_thread(cfg, _local_only) as url:
        yield LiveServer(url, cfg.data_dir, model_dir)
