"""A real tuneloop server on 127.0.0.1 (a free port), run in a thread of the test process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    # The first admin's token, read from the data dir as the server starts: the server removes
    # the file at the token's first sign-in.
    token: str

    @property
    def auth(self) -> dict[str, str]:
        """Headers that sign in as the first admin."""
        return {"Authorization": f"Bearer {self.token}"}

    def account(self, name: str, role: str = "user") -> dict[str, str]:
        """Make an account through the API; headers that sign in as it."""
        return {"Authorization": f"Bearer {self.account_token(name, role)}"}

    def account_token(self, name: str, role: str = "user") -> str:
        """Make an account through the API; its token."""
        made = httpx.post(
            f"{self.url}/v1/admin/users", json={"name": name, "role": role}, headers=self.auth
        )
        made.raise_for_status()
        return made.json()["token"]

    @contextmanager
    def ui_client(self, name: str, token: str) -> Iterator[httpx.Client]:
        """A client signed in to the UI as `name` through Gradio's login form, keeping its
        session cookie (`ui_call` calls the UI's handlers with it)."""
        with httpx.Client(base_url=self.url, timeout=60) as client:
            signed = client.post("/login", data={"username": name, "password": token})
            assert signed.status_code == 200, signed.text
            yield client


def ui_call(client: httpx.Client, handler: str, *inputs: object) -> httpx.Response:
    """Call a UI event handler by its Gradio API name (`/gradio_api/info` lists them), as the
    page does for events that skip the queue (a generator gives its first output and goes no
    further: `ui_queue_call` runs one to its end)."""
    return client.post(f"/gradio_api/run/{handler}", json={"data": list(inputs)})


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
        token = cfg.data_dir.admin_token_file.read_text().strip()
        yield LiveServer(url, cfg.data_dir, model_dir, token)


def ui_queue_call(
    client: httpx.Client, handler: str, *inputs: object, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Call a handler through Gradio's queue, as the page does for most events: join, then
    read the event's stream to its end (every input, a `gr.State`'s too). The join's status,
    and the stream's text."""
    config = client.get("/config")
    if config.status_code != 200:
        return config.status_code, ""
    fn = next(d["id"] for d in config.json()["dependencies"] if d.get("api_name") == handler)
    session = uuid.uuid4().hex
    body = {"data": list(inputs), "fn_index": fn, "session_hash": session}
    joined = client.post("/gradio_api/queue/join", json=body, headers=headers)
    if joined.status_code != 200:
        return joined.status_code, joined.text
    lines = []
    with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if "process_completed" in line:
                break
    return 200, "\n".join(lines)
