"""The web UI (Gradio), mounted at / by the server behind a sign-in with the same accounts as
the API (name and token): chat, blind comparisons, rankings, and for operators an operator's
view. Every answer and every piece of feedback goes through `ChatService`, the same code the HTTP
API runs, so both store exactly the same records, under the signed-in account's name."""

from __future__ import annotations

import gradio as gr

from tuneloop.loop.control import LoopControl
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.limits import Limits
from tuneloop.serve.rating_desk import RatingDesk
from tuneloop.serve.ui_chat import chat_tab
from tuneloop.serve.ui_common import signed_in
from tuneloop.serve.ui_judge import compare_tab, rank_tab
from tuneloop.serve.ui_operator import operator_tab, operator_visibility


def build_ui(
    service: ChatService,
    control: LoopControl,
    desk: RatingDesk,
    principals: Principals,
    limits: Limits,
) -> gr.Blocks:
    """The Blocks app; `server.build_app` mounts it next to the API with `principals`' sign-in,
    and the same `limits`."""
    # No analytics: Gradio would otherwise report to its servers and check its version there.
    with gr.Blocks(title="tuneloop", analytics_enabled=False) as ui:
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown(
                    "## tuneloop\nA chat assistant that learns from you: your votes, ratings, "
                    "edits, comparisons and rankings train its next version."
                )
            with gr.Column(scale=1, min_width=260):
                who = gr.Markdown(elem_id="signed-in-as")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab(service, principals, limits)
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Two answers to one prompt, shown blind. Which is better? Raters: **Next "
                    "task** brings a prompt someone asked."
                )
                compare_tab(service, desk, principals, limits)
            with gr.Tab("Rank", id="rank"):
                gr.Markdown("Several answers to one prompt: order them from best to worst.")
                rank_tab(service, desk, principals, limits)
            operator = operator_tab(service, control, desk, principals)

        def greet(request: gr.Request) -> str:
            account = signed_in(principals, request)
            if account is None:
                return ""
            return f"Signed in as **{account.name}** ({account.role}) · [Sign out](/logout)"

        ui.load(greet, None, who, queue=False)
        ui.load(operator_visibility(principals), None, operator, queue=False)
    return ui
