"""SmolLM2-135M-Instruct in a real browser: what a new user sees after `tuneloop up`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from live_server import LiveServer, live_server

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LiveServer]:
    yield from live_server(tmp_path_factory.mktemp("smollm2-ui") / "data", smollm2_dir)


def test_the_chat_answers_a_factual_question_sensibly(page: Any, server: LiveServer) -> None:
    page.get_by_text("Sampling").click()
    temperature = page.get_by_role("spinbutton", name=re.compile("Temperature"))
    temperature.fill("0")
    temperature.press("Enter")
    page.get_by_placeholder("Type a message and press Enter").fill("What is the capital of France?")
    page.keyboard.press("Enter")
    status = page.locator("#chat-status")
    status.get_by_text("Last answer #").wait_for(timeout=60_000)
    answer = page.locator(".message.bot").last.inner_text()
    assert "Paris" in answer, answer
    response_id = int(re.search(r"Last answer #(\d+)", status.inner_text())[1])
    with duckdb.connect(str(server.data_dir.db)) as con:
        [(params,)] = con.execute(
            "SELECT params FROM responses WHERE id = ?", [response_id]
        ).fetchall()
    assert json.loads(params)["temperature"] == 0.0  # the slider's value reached the engine
