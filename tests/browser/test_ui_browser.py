"""The UI driven in a real browser: what a person does there ends up in the feedback store."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest
from conftest import account_token, signed_in_page
from live_server import LiveServer

pytestmark = pytest.mark.browser

RATER = "browser-tester"  # the account the page signs in as

# Records the lengths the last bot message goes through, to tell a stream from one late update.
WATCH_STREAM = """() => {
    window.__lengths = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('.message.bot');
        if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def db_rows(server: LiveServer, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute(sql, params or []).fetchall()


def printable(text: str) -> str:
    """Text as compared with a text box's value: a random model writes control characters,
    which the browser does not keep as they are."""
    return "".join(ch for ch in text if ch.isprintable())


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    """The UI signed in as a rater: what it does is stored under that account's name."""
    pg = signed_in_page(browser, server, RATER, account_token(server, RATER, "rater"))
    yield pg
    pg.context.close()


def test_chat_answer_streams_and_thumbs_up_is_stored_with_its_version(
    page: Any, server: LiveServer
) -> None:
    page.evaluate(WATCH_STREAM)
    page.get_by_placeholder("Type a message and press Enter").fill("What is a tuple?")
    page.keyboard.press("Enter")
    status = page.locator("#chat-status")
    status.get_by_text("Last answer #").wait_for()
    match = re.search(r"Last answer #(\d+) by model version (\S+) ", status.inner_text())
    assert match, status.inner_text()
    response_id, version = int(match[1]), match[2]
    assert len(set(page.evaluate("window.__lengths"))) > 2, "the answer did not stream"

    page.get_by_label("Like", exact=True).click()
    status.get_by_text(f"Thumbs up stored for answer #{response_id}").wait_for()

    rows = db_rows(
        server,
        "SELECT t.value, t.rater_id, r.model_version_id, r.prompt, r.rater_id "
        "FROM thumbs t JOIN responses r ON r.id = t.response_id WHERE r.id = ?",
        [response_id],
    )
    assert len(rows) == 1
    value, thumbs_rater, answered_by, prompt, asker = rows[0]
    assert (value, thumbs_rater, asker) == (1, RATER, RATER)
    assert answered_by == version == "policy-v1"
    assert json.loads(prompt) == [{"role": "user", "content": "What is a tuple?"}]


def test_compare_two_blind_answers_stores_a_comparison(page: Any, server: LiveServer) -> None:
    page.get_by_role("tab", name="Compare").click()
    page.get_by_placeholder("Or a prompt of your own, to answer twice").fill("Explain sorting.")
    page.get_by_role("button", name="Get two answers").click()
    page.get_by_text("Which answer is better?").wait_for()
    shown = [page.get_by_label(label, exact=True).input_value() for label in ("A", "B")]
    assert all(shown) and shown[0] != shown[1]

    page.get_by_role("button", name="A better").click()
    note = page.get_by_text(re.compile(r"comparison #\d+"))
    note.wait_for()
    comparison_id = int(re.search(r"comparison #(\d+)", note.inner_text())[1])
    assert page.get_by_label("A", exact=True).input_value() == ""  # cleared for the next one

    rows = db_rows(
        server,
        "SELECT c.winner, c.rater_id, a.text, b.text, a.prompt_hash = b.prompt_hash, a.prompt "
        "FROM comparisons c JOIN responses a ON a.id = c.response_a "
        "JOIN responses b ON b.id = c.response_b WHERE c.id = ?",
        [comparison_id],
    )
    assert len(rows) == 1
    winner, rater, text_a, text_b, same_prompt, prompt = rows[0]
    assert (winner, rater, same_prompt) == ("a", RATER, True)
    assert [printable(text_a), printable(text_b)] == [printable(t) for t in shown]
    assert json.loads(prompt) == [{"role": "user", "content": "Explain sorting."}]


def test_rank_refuses_a_non_permutation_then_stores_the_ranking(
    page: Any, server: LiveServer
) -> None:
    page.get_by_role("tab", name="Rank").click()
    page.get_by_placeholder("Or a prompt of your own, to answer several times").fill("Name a loop.")
    page.get_by_role("button", name="Get answers").click()
    # Three answers generated one after another: on 2 busy cores this took over 20 s once.
    page.get_by_text("Rank them: 1 is the best.").wait_for(timeout=60_000)
    boxes = [page.get_by_label(f"Answer {i}", exact=True) for i in (1, 2, 3)]
    shown = [box.input_value() for box in boxes]
    assert all(shown)
    rank_boxes = page.get_by_label("Rank (1 = best)")

    def choose(ranks: list[int]) -> None:
        for i, rank in enumerate(ranks):
            box = rank_boxes.nth(i)
            box.click()
            options = page.locator(f"#{box.get_attribute('aria-controls')}")  # this box's list
            options.get_by_role("option", name=str(rank), exact=True).click()

    choose([1, 1, 2])
    page.get_by_role("button", name="Save ranking").click()
    page.get_by_text("rank 1 used more than once; rank 3 not used").first.wait_for()

    choose([2, 3, 1])
    page.get_by_role("button", name="Save ranking").click()
    note = page.get_by_text(re.compile(r"Ranking #\d+ stored"))
    note.wait_for()
    assert "(answer 3, answer 1, answer 2)" in note.inner_text()
    ranking_id = int(re.search(r"Ranking #(\d+)", note.inner_text())[1])

    rows = db_rows(server, "SELECT rater_id, response_ids FROM rankings WHERE id = ?", [ranking_id])
    assert len(rows) == 1
    rater, best_first = rows[0]
    assert rater == RATER
    texts = dict(db_rows(server, "SELECT id, text FROM responses WHERE id IN ?", [best_first]))
    assert [printable(texts[i]) for i in best_first] == [printable(shown[i]) for i in (2, 0, 1)]
