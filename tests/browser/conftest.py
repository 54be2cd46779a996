"""Browser test fixtures: a live server with the UI, and Debian's chromium via Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, live_server

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module", params=["embedded", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
) -> Iterator[LiveServer]:
    """One server (API and UI) per test module and engine: starting one loads the model."""
    data = tmp_path_factory.mktemp("ui") / "data"
    if request.param == "embedded":
        yield from live_server(data, tiny_model_dir)
        return
    from tuneloop.core.config import VllmSettings, vllm_python_command

    python = request.getfixturevalue("vllm_python")
    settings = VllmSettings(command=vllm_python_command(python), dtype="float32")
    yield from live_server(data, tiny_model_dir, engine="vllm", vllm=settings)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(reason=NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def account_token(server: LiveServer, name: str, role: str) -> str:
    """A token of account `name` (made with `role` the first time; a new token later)."""
    made = httpx.post(
        f"{server.url}/v1/admin/users", json={"name": name, "role": role}, headers=server.auth
    )
    if made.status_code == 422 and "exists already" in made.text:
        made = httpx.post(f"{server.url}/v1/admin/users/{name}/token", headers=server.auth)
    made.raise_for_status()
    return made.json()["token"]


def signed_in_page(browser: Any, server: LiveServer, name: str, token: str) -> Any:
    """A fresh browser context (its own Gradio session) signed in as `name`, on the UI. The
    sign-in posts the login form Gradio's page sends; close the page's context afterwards."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(20_000)
    login = context.request.post(f"{server.url}/login", form={"username": name, "password": token})
    assert login.ok, login.text()
    pg = context.new_page()
    pg.goto(server.url)
    return pg


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    """The UI signed in as the first admin, who sees every tab."""
    pg = signed_in_page(browser, server, "admin", server.token)
    yield pg
    pg.context.close()
