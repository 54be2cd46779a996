"""The Operator tab's raters section and the human gate's place in it: view functions."""

from __future__ import annotations

from tuneloop.core.records import ModelVersion
from tuneloop.feedback.arena import Standing
from tuneloop.feedback.raters import PairAgreement, RaterQuality, RaterReport
from tuneloop.serve.ui_operator import status_markdown, versions_frame
from tuneloop.serve.ui_raters import board_frame, pairs_frame, raters_frame, summary_markdown

REPORT = RaterReport(
    0.41,
    [
        RaterQuality("ann", 40, 0.52, 4, 5, False),
        RaterQuality("rnd", 38, -0.03, 1, 5, True),
        RaterQuality("new", 0, None, 0, 0, False),
    ],
    [PairAgreement("ann", "rnd", 0.04, 30)],
)


def test_raters_table_shows_agreement_gold_and_quarantine() -> None:
    frame = raters_frame(REPORT)
    assert frame.values.tolist() == [
        ["ann", 40, "0.52", "4/5", ""],
        ["rnd", 38, "-0.03", "1/5", "yes"],
        ["new", 0, "—", "—", ""],
    ]
    assert pairs_frame(REPORT).values.tolist() == [["ann", "rnd", "0.04", 30]]
    counts = {"tasks": 9, "open": 4, "done": 5, "gold": 1, "judgments": 17}
    assert summary_markdown(counts, REPORT) == (
        "**Rating tasks:** 9 (4 open, 5 done, 1 gold; 17 judgments) · **Agreement** "
        "(Krippendorff's alpha, all raters): 0.41"
    )


def test_leaderboard_table_shows_each_versions_interval() -> None:
    board = [Standing("policy-v2", 1043.6, 1011.2, 1080.9, 120, 71.5)]
    assert board_frame(board).values.tolist() == [["policy-v2", "1044", "1011 – 1081", 120, 71.5]]


def test_the_human_verdict_stands_beside_the_gates_and_the_canary_in_the_status() -> None:
    human = {"win_rate": 0.62, "lower": 0.57, "upper": 0.67, "judgments": 385}
    version = ModelVersion(
        "policy-v3",
        "policy",
        "base",
        "/m",
        metrics={"gate": {"win_rate": 0.7}, "human_gate": human},
    )
    row = versions_frame([version]).iloc[0]
    assert row["win rate"] == "0.700" and row["people"] == "0.62 [0.57, 0.67] of 385"
    status = {
        "served_version": "policy-v2",
        "registry_promoted": "policy-v2",
        "schedule": {"enabled": False},
        "new_feedback_rows": 0,
        "canary": {
            "version": "policy-v3",
            "share": 0.1,
            "min_judgments": 385,
            "verdict": {"judgments": 40, "win_rate": 0.55},
        },
    }
    assert (
        "Canary **policy-v3** answers 10% of conversations: 40 of 385 human judgments, win rate "
        "so far **0.55**." in status_markdown(status)
    )
    assert "look at it again" not in status_markdown(status)
    flagged = {"version": "policy-v2", "status": "promoted", "raters": ["rnd"]}
    assert (
        "Canary **policy-v2** was promoted with judgments of rnd, quarantined or disabled since"
        in status_markdown(status | {"flagged_canaries": [flagged]})
    )
