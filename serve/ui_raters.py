"""The Operator tab's raters section: the task queue, how well raters agree (Krippendorff's
alpha, Cohen's kappa per pair), their gold accuracy, quarantine, and the leaderboard of model
versions by human judgments. Every handler checks the operator role again."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from tuneloop.core.settings import TrustSettings
from tuneloop.feedback import accounts, raters, tasks
from tuneloop.feedback.leaderboard import version_leaderboard
from tuneloop.serve.auth import Principals
from tuneloop.serve.rating_desk import RatingDesk
from tuneloop.serve.ui_common import signed_in

RATER_COLUMNS = ["rater", "shared items", "alpha", "gold", "quarantined"]
BOARD_COLUMNS = ["version", "rating", "95% interval", "battles", "wins"]
PAIR_COLUMNS = ["rater", "rater ", "kappa", "items in common"]
# Bootstrap rounds for the leaderboard shown here (the CLI takes --rounds).
UI_ROUNDS = 300


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def raters_frame(report: raters.RaterReport) -> pd.DataFrame:
    rows = [
        [
            r.name,
            r.judgments,
            _num(r.alpha),
            f"{r.gold_correct}/{r.gold_total}" if r.gold_total else "—",
            "yes" if r.quarantined else "",
        ]
        for r in report.raters
    ]
    return pd.DataFrame(rows, columns=RATER_COLUMNS)


def pairs_frame(report: raters.RaterReport) -> pd.DataFrame:
    rows = [[p.a, p.b, _num(p.kappa), p.common] for p in report.pairs]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def board_frame(standings: list[Any]) -> pd.DataFrame:
    rows = [
        [s.version, f"{s.rating:.0f}", f"{s.lower:.0f} – {s.upper:.0f}", s.battles, s.wins]
        for s in standings
    ]
    return pd.DataFrame(rows, columns=BOARD_COLUMNS)


def summary_markdown(counts: dict[str, int], report: raters.RaterReport) -> str:
    return (
        f"**Rating tasks:** {counts['tasks']} ({counts['open']} open, {counts['done']} done, "
        f"{counts['gold']} gold; {counts['judgments']} judgments) · **Agreement** "
        f"(Krippendorff's alpha, all raters): {_num(report.alpha)}"
    )


def raters_panel(desk: RatingDesk, principals: Principals, trust: TrustSettings) -> None:
    """Build the section inside the current Blocks context (the Operator tab)."""
    store = desk.service.store
    gr.Markdown("### Raters and the arena of versions")
    summary = gr.Markdown(elem_id="raters-summary")
    with gr.Row(equal_height=True):
        refresh = gr.Button("Refresh raters", min_width=130, scale=0)
        count = gr.Number(10, label="Tasks to make from traffic", precision=0, minimum=1)
        make = gr.Button("Make tasks", min_width=110, scale=0)
    with gr.Row(equal_height=True):
        name = gr.Textbox(label="Rater", placeholder="a rater's name")
        hold = gr.Button("Quarantine", variant="stop", min_width=110, scale=0)
        free = gr.Button("Reinstate", min_width=110, scale=0)
    rater_table = gr.Dataframe(headers=RATER_COLUMNS, label="Raters")
    board = gr.Dataframe(headers=BOARD_COLUMNS, label="Leaderboard: versions by people")
    pairs = gr.Dataframe(headers=PAIR_COLUMNS, label="Agreement per pair (Cohen's kappa)")
    outputs = [summary, rater_table, board, pairs]

    def view() -> list[Any]:
        report = raters.rater_report(store)
        standings = version_leaderboard(store, trust, rounds=UI_ROUNDS)
        return [
            summary_markdown(tasks.task_counts(store), report),
            raters_frame(report),
            board_frame(standings),
            pairs_frame(report),
        ]

    def on_refresh(request: gr.Request) -> list[Any]:
        if signed_in(principals, request, "operator") is None:
            return [gr.skip()] * len(outputs)
        return view()

    def on_make(n: float | None, request: gr.Request) -> list[Any]:
        account = signed_in(principals, request, "operator")
        if account is None:
            return [gr.skip()] * len(outputs)
        made = desk.make_from_traffic(max(1, int(n or 1)))
        accounts.audit(store, account.name, "tasks.make", "traffic", tasks=len(made), via="ui")
        gr.Info(f"Made {len(made)} tasks." if made else "No new prompts in the traffic.")
        return view()

    def on_hold(rater: str, request: gr.Request) -> list[Any]:
        account = signed_in(principals, request, "operator")
        if account is None or not rater.strip():
            return [gr.skip()] * len(outputs)
        held = desk.quarantine([rater.strip()], "by hand in the UI", actor=account.name)
        gr.Info(f"Quarantined {rater}." if held else f"{rater} was quarantined already.")
        return view()

    def on_free(rater: str, request: gr.Request) -> list[Any]:
        account = signed_in(principals, request, "operator")
        if account is None or not rater.strip():
            return [gr.skip()] * len(outputs)
        if desk.reinstate(rater.strip(), actor=account.name):
            gr.Info(f"Reinstated {rater}.")
        else:
            gr.Warning(f"{rater} is not quarantined.")
        return view()

    refresh.click(on_refresh, None, outputs)
    make.click(on_make, count, outputs, concurrency_limit=1)
    hold.click(on_hold, name, outputs)
    free.click(on_free, name, outputs)
