"""A rater's "Next task" flow in a real browser: a prompt someone else asked comes up in
Compare and in Rank, blind; the verdict is stored as a vote on that task, and progress counts
it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import httpx
import pytest
from conftest import account_token, signed_in_page
from live_server import LiveServer

pytestmark = pytest.mark.browser

RATER = "task-rater"


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    pg = signed_in_page(browser, server, RATER, account_token(server, RATER, "rater"))
    yield pg
    pg.context.close()


def db_rows(server: LiveServer, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(sql, params or []).fetchall()


def make_task(server: LiveServer, **body: Any) -> int:
    made = httpx.post(f"{server.url}/v1/admin/tasks", json=body, headers=server.auth, timeout=300)
    made.raise_for_status()
    (task_id,) = made.json()["made"]
    return task_id


def choose(page: Any, ranks: list[int]) -> None:
    boxes = page.get_by_label("Rank (1 = best)")
    for i, rank in enumerate(ranks):
        box = boxes.nth(i)
        box.click()
        options = page.locator(f"#{box.get_attribute('aria-controls')}")  # this box's list
        options.get_by_role("option", name=str(rank), exact=True).click()


def test_a_rater_judges_the_next_task_in_compare_then_in_rank(
    page: Any, server: LiveServer
) -> None:
    user = {"Authorization": f"Bearer {account_token(server, 'asker', 'user')}"}
    asked = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 8},
        headers=user,
        timeout=60,
    )
    asked.raise_for_status()
    compare_task = make_task(server, source="traffic", limit=1, overlap=1)
    rank_task = make_task(server, source="prompts", prompts=["Name three colours."], answers=3)

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Next task").filter(visible=True).click()
    page.get_by_text("Which answer is better?").wait_for()
    assert "Why is the sky blue?" in page.locator("#compare-task-prompt").inner_text()
    page.get_by_role("button", name="B better").click()
    page.get_by_text("Stored “B better”.").wait_for()
    page.locator("#compare-progress").get_by_text("Tasks judged: 1").wait_for()
    item = db_rows(server, "SELECT item FROM tasks WHERE id = ?", [compare_task])[0][0]
    assert db_rows(
        server, "SELECT winner FROM comparisons WHERE rater_id = ? AND item = ?", [RATER, item]
    ) == [("b",)]

    page.get_by_role("tab", name="Rank").click()
    page.get_by_role("button", name="Next task").filter(visible=True).click()
    page.get_by_text("Rank them.").wait_for()
    assert "Name three colours." in page.locator("#rank-task-prompt").inner_text()
    shown = [page.get_by_label(f"Answer {i}", exact=True).input_value() for i in (1, 2, 3)]
    choose(page, [3, 1, 2])
    page.get_by_role("button", name="Save ranking").click()
    page.get_by_text("Stored (answer 2, answer 3, answer 1).").wait_for()
    item = db_rows(server, "SELECT item FROM tasks WHERE id = ?", [rank_task])[0][0]
    (best_first,) = db_rows(
        server, "SELECT response_ids FROM rankings WHERE rater_id = ? AND item = ?", [RATER, item]
    )[0]
    texts = dict(db_rows(server, "SELECT id, text FROM responses WHERE id IN ?", [best_first]))
    # A textarea's value has its line breaks as LF, whatever the answer had (the toy model's
    # text may hold a CR).
    stored = [texts[i].replace("\r\n", "\n").replace("\r", "\n")[:20] for i in best_first]
    assert stored == [shown[i][:20] for i in (1, 2, 0)]
